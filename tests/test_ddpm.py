"""ddpm.py against closed forms, invariants and the reference values of EXPERIMENTS.md §1 (computed there
from the official/improved-diffusion code). The `ref_*` helpers are an independent float64 numpy
transcription of improved-diffusion's formulas, used as the oracle on random inputs."""
import math

import numpy as np
import pytest
import torch

from ddpm import (Diffusion, DiffusionConfig, cosine_betas, discretized_gaussian_log_likelihood, linear_betas,
                  normal_kl, space_timesteps)

T = 4000


@pytest.fixture(scope="module")
def diffusion():
    return DiffusionConfig(num_steps=T).build()


# ----- schedules -----

def test_cosine_schedule_reference_values():
    b = cosine_betas(T)
    a_bar = np.cumprod(1 - b)
    np.testing.assert_allclose(b[[0, 1, 3997, 3998]], [9.8658188e-06, 1.0169415e-05, 0.55555544, 0.74999996],
                               rtol=1e-6)
    assert b[-1] == 0.999 and (b[:-1] < 0.999).all()   # only the last entry is clipped
    np.testing.assert_allclose(a_bar[[0, 1999]], [0.99999013, 0.49384359], rtol=1e-6)
    np.testing.assert_allclose(a_bar[-1], 1.518e-10, rtol=1e-3)


def test_cosine_alpha_bar_matches_closed_form():
    """[IDDPM eq. 17]: ᾱ_t = f(t)/f(0), f(u) = cos²((u/T + s)/(1 + s) · π/2), for every unclipped step."""
    s = 0.008
    f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2
    a_bar = np.cumprod(1 - cosine_betas(T))
    t = np.arange(T - 1)
    np.testing.assert_allclose(a_bar[t], f(t + 1) / f(0), rtol=1e-9)


def test_linear_schedule_endpoints():
    b = linear_betas(T)
    np.testing.assert_allclose([b[0], b[-1]], [2.5e-05, 5e-03])
    np.testing.assert_allclose(linear_betas(1000)[[0, -1]], [1e-4, 0.02])


def test_schedule_max_beta_clipping():
    assert cosine_betas(100, max_beta=0.5).max() == 0.5


# ----- forward process and posterior -----

def test_posterior_reference_values(diffusion):
    np.testing.assert_allclose(diffusion.posterior_variance[:3], [0.0, 5.0076834e-06, 6.8778242e-06], rtol=1e-6,
                               atol=1e-20)
    np.testing.assert_allclose(diffusion.posterior_log_variance_clipped[:2], [-12.2045371, -12.2045371], rtol=1e-7)


def test_posterior_of_known_gaussian(diffusion):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}."""
    torch.manual_seed(0)
    x0, xt = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([1, 10, 500, 2000, 3999])
    mean, var, _ = diffusion.q_posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        a_bar_prev, alpha, beta = diffusion.alphas_cumprod[ti - 1], diffusion.alphas[ti], diffusion.betas[ti]
        prec = 1 / (1 - a_bar_prev) + alpha / beta
        mu = (math.sqrt(a_bar_prev) * x0[i].double() / (1 - a_bar_prev) + math.sqrt(alpha) * xt[i].double() / beta) / prec
        torch.testing.assert_close(mean[i].double(), mu, rtol=1e-4, atol=1e-5)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-5)


def test_q_sample_moments(diffusion):
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.7)
    for ti in (0, 1999, 3999):
        xt = diffusion.q_sample(x0, torch.full((20000,), ti))
        a = diffusion.alphas_cumprod[ti]
        assert xt.mean().item() == pytest.approx(0.7 * math.sqrt(a), abs=0.02)
        assert xt.var().item() == pytest.approx(1 - a, abs=0.02 + 0.05 * (1 - a))


def test_x0_eps_round_trip(diffusion):
    torch.manual_seed(0)
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 7, 1000, 3000])
    xt = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(xt, t, eps), x0, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(xt, t, x0), eps, rtol=1e-3, atol=2e-3)


# ----- Gaussian helpers -----

def test_kl_of_identical_gaussians_is_zero():
    m, lv = torch.randn(100), torch.randn(100)
    assert normal_kl(m, lv, m, lv).abs().max().item() < 1e-6


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    m1, lv1, m2, lv2 = torch.randn(4, 50).double().unbind(0)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


def test_discretized_likelihood_sums_to_one():
    grid = torch.arange(256).double() / 127.5 - 1
    for mean, log_scale in ((0.0, math.log(0.1)), (0.9, math.log(0.02)), (-1.0, math.log(0.5)), (0.3, -6.0)):
        p = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), torch.full_like(grid, log_scale)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=2e-3)


# ----- reverse process -----

def constant_model(eps, v):
    return lambda x, t, **kw: torch.cat([torch.full_like(x, eps), torch.full_like(x, v)], dim=1)


def test_learned_variance_endpoints(diffusion):
    """v = +1 gives log β_t, v = -1 gives the clipped log β̃_t [IDDPM eq. 15]."""
    x, t = torch.zeros(3, 2, 4, 4), torch.tensor([0, 5, 3000])
    hi = diffusion.p_mean_variance(constant_model(0.0, 1.0), x, t)["log_variance"]
    lo = diffusion.p_mean_variance(constant_model(0.0, -1.0), x, t)["log_variance"]
    for i, ti in enumerate(t.tolist()):
        assert hi[i].flatten()[0].item() == pytest.approx(math.log(diffusion.betas[ti]), rel=1e-5)
        assert lo[i].flatten()[0].item() == pytest.approx(diffusion.posterior_log_variance_clipped[ti], rel=1e-5)


def ref_p_mean_variance(d, out, xt, t, clip):
    """Independent float64 numpy oracle of improved-diffusion's p_mean_variance (LEARNED_RANGE, EPSILON)."""
    out, xt = out.double().numpy(), xt.double().numpy()
    c = xt.shape[1]
    eps, v = out[:, :c], out[:, c:]
    g = lambda a: a[t.numpy()][:, None, None, None]
    min_log, max_log = g(d.posterior_log_variance_clipped), g(np.log(d.betas))
    log_var = (v + 1) / 2 * max_log + (1 - (v + 1) / 2) * min_log
    x0 = np.sqrt(1 / g(d.alphas_cumprod)) * xt - np.sqrt(1 / g(d.alphas_cumprod) - 1) * eps
    if clip:
        x0 = np.clip(x0, -1, 1)
    a_prev = g(d.alphas_cumprod_prev)
    mean = (g(d.betas) * np.sqrt(a_prev) / (1 - g(d.alphas_cumprod)) * x0
            + (1 - a_prev) * np.sqrt(g(d.alphas)) / (1 - g(d.alphas_cumprod)) * xt)
    return mean, log_var, x0


@pytest.mark.parametrize("respacing", [None, 250, 64])
@pytest.mark.parametrize("clip", [True, False])
def test_p_mean_variance_matches_reference(diffusion, respacing, clip):
    d = diffusion if respacing is None else diffusion.respace(respacing)
    torch.manual_seed(1)
    xt, out = torch.randn(6, 3, 5, 5), torch.randn(6, 6, 5, 5)
    t = torch.tensor([0, 1, 2, d.num_steps // 2, d.num_steps - 2, d.num_steps - 1])
    got = d.p_mean_variance(None, xt, t, clip_denoised=clip, model_output=out)
    mean, log_var, x0 = ref_p_mean_variance(d, out, xt, t, clip)
    np.testing.assert_allclose(got["mean"].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["log_variance"].numpy(), log_var, rtol=1e-5)
    np.testing.assert_allclose(got["pred_x0"].numpy(), x0, rtol=1e-5, atol=1e-5)


def test_vb_matches_reference_including_t0(diffusion):
    torch.manual_seed(2)
    x0 = (torch.randint(0, 256, (4, 3, 6, 6)).float() / 127.5 - 1)
    noise, out = torch.randn(4, 3, 6, 6), torch.randn(4, 6, 6, 6) * 0.5
    t = torch.tensor([0, 1, 1500, 3999])
    xt = diffusion.q_sample(x0, t, noise)
    got = diffusion.vb_terms_bpd(x0, xt, t, model_output=out)
    mean, log_var, _ = ref_p_mean_variance(diffusion, out, xt, t, clip=False)
    g = lambda a: a[t.numpy()][:, None, None, None]
    x0n, xtn = x0.double().numpy(), xt.double().numpy()
    true_mean = (g(diffusion.posterior_mean_coef1) * x0n + g(diffusion.posterior_mean_coef2) * xtn)
    true_lv = g(diffusion.posterior_log_variance_clipped)
    kl = 0.5 * (-1 + log_var - true_lv + np.exp(true_lv - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
    kl = kl.mean(axis=(1, 2, 3)) / np.log(2)
    ls = 0.5 * log_var
    cdf = lambda y: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    cp, cm = cdf(np.exp(-ls) * (x0n - mean + 1 / 255)), cdf(np.exp(-ls) * (x0n - mean - 1 / 255))
    lp = np.where(x0n < -0.999, np.log(np.maximum(cp, 1e-12)),
                  np.where(x0n > 0.999, np.log(np.maximum(1 - cm, 1e-12)), np.log(np.maximum(cp - cm, 1e-12))))
    nll = -lp.mean(axis=(1, 2, 3)) / np.log(2)
    np.testing.assert_allclose(got.numpy(), np.where(t.numpy() == 0, nll, kl), rtol=1e-4)


def test_hybrid_loss_stop_gradient_and_scale(diffusion):
    """vb trains only v; mse trains only ε̂; loss = mse + vb_scale · vb."""
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    t = torch.tensor([0, 100, 3000])
    param = torch.zeros(1, 6, 1, 1, requires_grad=True)
    model = lambda x, tt: param.expand(x.shape[0], 6, *x.shape[2:]) + 0 * x.repeat(1, 2, 1, 1)
    losses = diffusion.training_losses(model, x0, t, noise=torch.randn_like(x0))
    g_vb, = torch.autograd.grad(losses["vb"].sum(), param, retain_graph=True)
    g_mse, = torch.autograd.grad(losses["mse"].sum(), param, retain_graph=True)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    d4 = Diffusion(diffusion.betas, vb_scale=T / 1000)
    l4 = d4.training_losses(model, x0, t, noise=torch.zeros_like(x0))
    torch.testing.assert_close(l4["loss"], l4["mse"] + 4.0 * l4["vb"])


# ----- respacing -----

def test_space_timesteps_reference_lists():
    k250 = space_timesteps(T, 250)
    assert k250[:5] == [0, 16, 32, 48, 64] and k250[-4:] == [3951, 3967, 3983, 3999] and len(k250) == 250
    k64 = space_timesteps(T, "64")
    assert k64[:5] == [0, 63, 127, 190, 254] and k64[-4:] == [3809, 3872, 3936, 3999] and len(k64) == 64
    assert space_timesteps(T, "ddim250") == list(range(0, T, 16))
    assert len(space_timesteps(100, "10,20")) == 30


def test_respace_all_steps_is_identity(diffusion):
    r = diffusion.respace(T)
    np.testing.assert_allclose(r.betas, diffusion.betas, rtol=1e-10)  # float64 round-off of 1 - ᾱ_k/ᾱ_{k-1}
    assert (r.timestep_map == np.arange(T)).all()


@pytest.mark.parametrize("k", [250, 64, 7])
def test_respaced_alpha_bar_equals_original_at_kept_steps(diffusion, k):
    r = diffusion.respace(k)
    np.testing.assert_allclose(r.alphas_cumprod, diffusion.alphas_cumprod[r.timestep_map], rtol=1e-7)


def test_respaced_beta_reference_values(diffusion):
    r250, r64 = diffusion.respace(250), diffusion.respace(64)
    np.testing.assert_allclose([r250.betas[0], r250.betas[1], r250.betas[-1]], [9.8658e-06, 1.99126e-04, 0.99999609],
                               rtol=1e-4)
    np.testing.assert_allclose([r64.betas[1], r64.betas[-1]], [1.23303e-03, 0.99999975], rtol=1e-5)


def test_respaced_chain_calls_networks_with_original_timesteps(diffusion):
    r = diffusion.respace(64)
    seen_model, seen_cond = [], []

    def model(x, t):
        seen_model.extend(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    def cond_fn(x, t):
        seen_cond.extend(t.tolist())
        return torch.zeros_like(x)

    r.p_sample_loop(model, (1, 3, 4, 4), cond_fn=cond_fn)
    assert seen_model == seen_cond == space_timesteps(T, 64)[::-1]


# ----- samplers -----

def point_mass_model(d, x_star):
    """The exact ε-predictor for data that is a single point x*: ε = (x_t - sqrt(ᾱ_t) x*) / sqrt(1-ᾱ_t)."""
    def model(x, t):
        a = torch.from_numpy(np.sqrt(d.alphas_cumprod))[t].float().view(-1, 1, 1, 1)
        eps = (x - a * x_star) / torch.sqrt(1 - a ** 2)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)
    return model


def test_samplers_recover_a_point_mass():
    base = DiffusionConfig(num_steps=1000).build()
    d = base.respace(50)
    x_star = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
    model = lambda x, t: point_mass_model(base, x_star)(x, t)
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(d.ddim_sample_loop(model, (2, 3, 4, 4), generator=gen), x_star.expand(2, -1, -1, -1),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(d.p_sample_loop(model, (2, 3, 4, 4), generator=gen), x_star.expand(2, -1, -1, -1),
                               atol=2e-2, rtol=0)


def test_ddim_eta0_is_deterministic_and_inverts(diffusion):
    d = diffusion.respace(40)
    torch.manual_seed(0)
    w = torch.randn(6, 3, 1, 1) * 0.1
    model = lambda x, t: torch.nn.functional.conv2d(x, w) * (1 + t.float().view(-1, 1, 1, 1) / 4000)
    noise = torch.randn(2, 3, 4, 4)
    a = d.ddim_sample_loop(model, noise.shape, noise=noise.clone())
    b = d.ddim_sample_loop(model, noise.shape, noise=noise.clone())
    assert torch.equal(a, b)
    x0 = torch.rand(2, 3, 4, 4) - 0.5
    latent = d.ddim_reverse_loop(model, x0, 20)
    back = d.ddim_sample_loop(model, x0.shape, noise=latent, t_start=20, clip_denoised=False)
    torch.testing.assert_close(back, x0, atol=5e-3, rtol=0)


def test_p_sample_guidance_shifts_mean_by_variance_times_gradient(diffusion):
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([5, 2000])
    model = constant_model(0.1, 0.3)
    grad = torch.randn_like(x)
    plain = diffusion.p_sample(model, x, t, noise=torch.zeros_like(x))["sample"]
    guided = diffusion.p_sample(model, x, t, cond_fn=lambda xx, tt: grad, noise=torch.zeros_like(x))["sample"]
    var = diffusion.p_mean_variance(model, x, t)["variance"]
    torch.testing.assert_close(guided - plain, var * grad)


def test_guidance_at_the_mean_takes_the_gradient_at_mu_with_the_timestep_of_x_t_minus_1(diffusion):
    r = diffusion.respace(64)
    x, j = torch.randn(2, 3, 4, 4), torch.tensor([10, 0])
    model = constant_model(0.1, 0.3)
    seen = {}

    def cond_fn(xx, tt):
        seen.update(x=xx.clone(), t=tt.tolist())
        return torch.ones_like(xx)

    out = r.p_mean_variance(model, x, j)
    guided = r.p_sample(model, x, j, cond_fn=cond_fn, noise=torch.zeros_like(x), guide_at="mean")["sample"]
    torch.testing.assert_close(seen["x"], out["mean"])
    assert seen["t"] == [int(r.timestep_map[9]), int(r.timestep_map[0])]     # x_{t-1}'s index; 0 at the last step
    torch.testing.assert_close(guided, out["mean"] + out["variance"])


def test_last_step_adds_no_noise(diffusion):
    x, t = torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    model = constant_model(0.0, 1.0)
    a = diffusion.p_sample(model, x, t)["sample"]
    b = diffusion.p_sample(model, x, t)["sample"]
    assert torch.equal(a, b)


# ----- DC correction (our addition; RESULTS.md session 4) -----

def test_dc_correction_recovers_the_noise_mean_when_every_image_has_the_same_mean(diffusion):
    """Circles: every image's channel means are equal, so DC(ε) is a function of DC(x_t): a network that gets
    everything but the DC right is made exact."""
    from data import channel_mean_stats, circles_dataset
    images, _, _ = circles_dataset(16)
    prior = channel_mean_stats(images)
    assert max(prior["var"]) < 1e-20
    chain = diffusion.with_dc_prior(prior["mean"], prior["var"])
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(127.5).sub(1).float()
    for step in (0, 10, 1000, 2000, 3500, 3999):
        t = torch.full((len(x0),), step)
        eps = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, eps)
        blind = eps - eps.mean(dim=(2, 3), keepdim=True)          # right except for the DC
        fixed = chain.dc_corrected_eps(x_t, t, blind)
        torch.testing.assert_close(fixed.mean(dim=(2, 3)), eps.mean(dim=(2, 3)), atol=2e-3, rtol=0)
        torch.testing.assert_close(fixed - fixed.mean(dim=(2, 3), keepdim=True), blind, atol=1e-6, rtol=0)
        x0_hat = diffusion.predict_x0_from_eps(x_t, t, fixed)   # float32 error × 1/sqrt(ᾱ) ≈ 1e5 at t = T-1
        torch.testing.assert_close(x0_hat.mean(dim=(2, 3)), x0.mean(dim=(2, 3)), atol=2e-3 if step < 3999 else 2e-2,
                                   rtol=0)


def test_dc_correction_is_the_least_squares_estimate_for_gaussian_image_means(diffusion):
    """u_0 ~ N(m, s²): the corrected DC is the regression of DC(ε) on DC(x_t), estimated here by Monte Carlo."""
    g = torch.Generator().manual_seed(0)
    n_img, side, m, s2 = 20000, 8, torch.tensor([-0.3, 0.1, 0.5]), torch.tensor([0.04, 0.01, 0.0025])
    chain = diffusion.with_dc_prior(m.numpy(), s2.numpy())
    for step in (50, 400, 2000):
        u0 = m + s2.sqrt() * torch.randn(n_img, 3, generator=g)
        x0 = u0[:, :, None, None].expand(n_img, 3, side, side)
        eps = torch.randn(n_img, 3, side, side, generator=g)
        t = torch.full((n_img,), step)
        x_t = diffusion.q_sample(x0, t, eps)
        fixed = chain.dc_corrected_eps(x_t, t, torch.zeros_like(eps)).mean(dim=(2, 3))
        u, target = x_t.mean(dim=(2, 3)).double(), eps.mean(dim=(2, 3)).double()
        for c in range(3):   # least-squares slope of DC(ε) on DC(x_t) vs the correction's exact slope
            du = u[:, c] - u[:, c].mean()
            slope = (du * target[:, c]).sum() / (du ** 2).sum()
            ours = (du * fixed[:, c]).sum() / (du ** 2).sum()
            resid = target[:, c] - target[:, c].mean() - slope * du
            se = resid.std() / (du.std() * n_img ** 0.5)
            assert abs(ours - slope) < 4 * se, (step, c, ours.item(), slope.item(), se.item())
            error = fixed[:, c] - target[:, c]   # unbiased: E[DC(ε) - estimate] = 0
            assert abs(error.mean()) < 4 * error.std() / n_img ** 0.5, (step, c)


def test_dc_prior_survives_respacing_and_none_changes_nothing(diffusion):
    chain = diffusion.with_dc_prior([0.0] * 3, [0.1] * 3)
    assert chain.respace(10).dc_prior is not None and diffusion.respace(10).dc_prior is None
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 3000])
    net = lambda x_t, t_: torch.cat([torch.randn_like(x_t), torch.zeros_like(x_t)], 1)
    torch.manual_seed(1)
    plain = diffusion.p_mean_variance(net, x, t)
    torch.manual_seed(1)
    fixed = chain.p_mean_variance(net, x, t)
    assert not torch.allclose(plain["eps"], fixed["eps"])
    torch.testing.assert_close(plain["eps"] - plain["eps"].mean(dim=(2, 3), keepdim=True),
                               fixed["eps"] - fixed["eps"].mean(dim=(2, 3), keepdim=True))
