"""ddpm.py on small hand-made chains: every table, loss and sampler step against values computed by hand (the
full-size chain against improved-diffusion's reference values: test_ddpm.py)."""
import math

import numpy as np
import pytest
import torch

from ddpm import GaussianDiffusion, DiffusionConfig, cosine_betas, discretized_gaussian_log_likelihood, normal_kl
from test_ddpm import ref_p_mean_variance

T = 4000


# ----- closed forms on small hand-made chains -----

SMALL_BETAS = np.array([0.1, 0.2, 0.3])


def small_abar():
    """ᾱ_t and ᾱ_{t-1} of SMALL_BETAS by hand: ᾱ = 0.9, 0.72, 0.504."""
    a = np.array([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7])
    return a, np.array([1.0, a[0], a[1]])


def test_approx_normal_cdf_is_the_tanh_formula_and_close_to_the_exact_cdf():
    from ddpm import approx_standard_normal_cdf
    y = np.array([-30.0, -3.0, -1.0, -0.2, 0.0, 0.5, 1.7, 3.0, 30.0])
    got = approx_standard_normal_cdf(torch.from_numpy(y)).numpy()
    tanh_form = 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in y])
    np.testing.assert_allclose(got, tanh_form, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got, exact, atol=5e-4)          # the approximation's own error is < 2e-4


def test_discretized_likelihood_edge_bins_and_floor():
    """Edge bins reach ±∞: log Φ((−1 − μ + 1/255)/σ) at x = −1 and log(1 − Φ((1 − μ − 1/255)/σ)) at x = 1; interior
    bins are log(Φ(+) − Φ(−)); a probability below 1e-12 is floored at 1e-12 (here the tanh saturates to 0)."""
    x = torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0, 0.0, 1.0 - 2 / 255], dtype=torch.float64)
    mu = torch.tensor([-0.98, 0.97, 0.01, 1.0, -1.0, 0.9, 0.99], dtype=torch.float64)
    sigma = np.array([0.05, 0.02, 0.1, 0.01, 0.01, 0.001, 0.03])
    got = discretized_gaussian_log_likelihood(x, mu, torch.from_numpy(np.log(sigma))).numpy()
    phi = lambda y: 0.5 * (1 + math.erf(y / math.sqrt(2)))
    xs, ms = x.numpy(), mu.numpy()
    want = [math.log(phi((xs[0] - ms[0] + 1 / 255) / sigma[0])),
            math.log(1 - phi((xs[1] - ms[1] - 1 / 255) / sigma[1])),
            math.log(phi((xs[2] - ms[2] + 1 / 255) / sigma[2]) - phi((xs[2] - ms[2] - 1 / 255) / sigma[2])),
            math.log(1e-12), math.log(1e-12), math.log(1e-12),
            math.log(phi((xs[6] - ms[6] + 1 / 255) / sigma[6]) - phi((xs[6] - ms[6] - 1 / 255) / sigma[6]))]
    np.testing.assert_allclose(got, want, rtol=2e-3)   # tanh approximation of Φ vs the exact erf


def test_normal_kl_hand_value():
    """KL(N(1, 1) || N(0, 4)) = ½(−1 + log 4 + 1/4 + 1/4) = ½(log 4 − 1/2)."""
    got = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(math.log(4.0)))
    assert got.item() == pytest.approx(0.5 * (math.log(4.0) - 0.5), rel=1e-6)


def test_diffusion_tables_by_hand():
    d = GaussianDiffusion(SMALL_BETAS)
    a, a_prev = small_abar()
    np.testing.assert_allclose(d.alphas_cumprod, a, rtol=1e-14)
    np.testing.assert_allclose(d.alphas_cumprod_prev, a_prev, rtol=1e-14)
    np.testing.assert_allclose(d.alphas_cumprod_next, [a[1], a[2], 0.0], rtol=1e-14)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / a - 1), rtol=1e-14)
    post = SMALL_BETAS * (1 - a_prev) / (1 - a)
    np.testing.assert_allclose(d.posterior_variance, post, rtol=1e-14)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log([post[1], post[1], post[2]]), rtol=1e-14)
    np.testing.assert_allclose(d.posterior_mean_coef1, SMALL_BETAS * np.sqrt(a_prev) / (1 - a), rtol=1e-14)
    np.testing.assert_allclose(d.posterior_mean_coef2, (1 - a_prev) * np.sqrt(1 - SMALL_BETAS) / (1 - a),
                               rtol=1e-14)
    assert d.timestep_map.tolist() == [0, 1, 2] and d.num_timesteps == 3
    assert (d.learn_sigma, d.sigma_small, d.vb_scale) == (True, False, 1.0)


def test_betas_must_lie_in_the_half_open_unit_interval():
    with np.errstate(divide="ignore"):
        GaussianDiffusion(np.array([0.5, 1.0]))                       # β = 1 is allowed (ᾱ reaches 0)
    for bad in ([0.0, 0.5], [0.5, 1.0 + 1e-9], [-0.1, 0.5], [[0.1, 0.2]]):
        with pytest.raises(AssertionError, match=r"^betas must lie in \(0, 1\]$"):
            GaussianDiffusion(np.array(bad))


def test_config_defaults_and_build():
    c = DiffusionConfig()
    assert (c.diffusion_steps, c.schedule, c.learn_sigma, c.sigma_small, c.vb_scale) == (4000, "cosine", True, False, 1.0)
    d = DiffusionConfig(diffusion_steps=100, schedule="linear", learn_sigma=False, sigma_small=True, vb_scale=2.5).build()
    np.testing.assert_allclose(d.betas, np.linspace(1e-3, 0.2, 100), rtol=1e-12)   # 1000/100 · (1e-4 .. 0.02)
    assert (d.learn_sigma, d.sigma_small, d.vb_scale) == (False, True, 2.5)
    np.testing.assert_allclose(DiffusionConfig(diffusion_steps=10).build().betas, cosine_betas(10), rtol=0)


def test_cosine_betas_by_hand_for_two_steps():
    """T = 2: f(u) = cos²((u + s)/(1 + s) · π/2); β_0 = 1 − f(½)/f(0), β_1 = 1 − f(1)/f(½) = 1 clipped to 0.999."""
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    np.testing.assert_allclose(cosine_betas(2), [1 - f(0.5) / f(0), 0.999], rtol=1e-14)
    np.testing.assert_allclose(cosine_betas(2, s=0.1, max_beta=0.99),
                               [1 - math.cos(0.6 / 1.1 * math.pi / 2) ** 2 / math.cos(0.1 / 1.1 * math.pi / 2) ** 2,
                                0.99], rtol=1e-14)


def test_respace_keeps_every_setting():
    d = GaussianDiffusion(np.linspace(0.01, 0.3, 9), learn_sigma=False, sigma_small=True, vb_scale=2.5)
    r = d.respace(3)
    assert (r.learn_sigma, r.sigma_small, r.vb_scale) == (False, True, 2.5)
    assert r.timestep_map.tolist() == [0, 4, 8]
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[[0, 4, 8]], rtol=1e-14)
    rr = r.respace(2)
    assert rr.timestep_map.tolist() == [0, 8] and (rr.learn_sigma, rr.sigma_small, rr.vb_scale) == (False, True, 2.5)


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variances_by_hand(sigma_small):
    """learn_sigma=False: Σ = β̃_t (sigma_small, log clipped at t = 0 to log β̃_1) or β_t with β_0 → β̃_1 [DDPM 3.2];
    the mean is the posterior mean at x̂_0 = (x_t − sqrt(1−ᾱ) ε̂)/sqrt(ᾱ), clamped to [−1, 1] by default."""
    d = GaussianDiffusion(SMALL_BETAS, learn_sigma=False, sigma_small=sigma_small)
    a, a_prev = small_abar()
    post = SMALL_BETAS * (1 - a_prev) / (1 - a)
    var = np.array([0.0, post[1], post[2]]) if sigma_small else np.array([post[1], 0.2, 0.3])
    log_var = np.log([post[1], post[1], post[2]]) if sigma_small else np.log(var)
    x = torch.tensor([0.5, -0.4, 1.9]).view(3, 1, 1, 1).expand(3, 2, 1, 1).contiguous()
    t = torch.tensor([0, 1, 2])
    e = 0.3
    model = lambda xx, tt: torch.full_like(xx, e)
    out = d.p_mean_variance(model, x, t)
    np.testing.assert_allclose(out["variance"][:, 0, 0, 0].double().numpy(), var, rtol=1e-6)
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].double().numpy(), log_var, rtol=1e-6)
    assert out["variance"].shape == x.shape and out["log_variance"].shape == x.shape
    xn = np.array([0.5, -0.4, 1.9])
    x0 = np.clip((xn - np.sqrt(1 - a) * e) / np.sqrt(a), -1, 1)
    mean = (SMALL_BETAS * np.sqrt(a_prev) * x0 + (1 - a_prev) * np.sqrt(1 - SMALL_BETAS) * xn) / (1 - a)
    np.testing.assert_allclose(out["pred_x0"][:, 0, 0, 0].double().numpy(), x0, rtol=1e-6)
    np.testing.assert_allclose(out["mean"][:, 0, 0, 0].double().numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(out["eps"].numpy(), e, rtol=1e-7)


def test_learned_variance_interpolates_in_log_space_by_hand():
    """v = 0 gives the geometric mean of β_t and β̃_t (log clipped), v = 0.5 three quarters of the way [IDDPM eq. 15]."""
    d = GaussianDiffusion(SMALL_BETAS)
    a, a_prev = small_abar()
    post = SMALL_BETAS * (1 - a_prev) / (1 - a)
    lo = np.log([post[1], post[1], post[2]])
    x, t = torch.zeros(3, 1, 1, 1), torch.tensor([0, 1, 2])
    for v in (0.0, 0.5):
        out = d.p_mean_variance(lambda xx, tt: torch.cat([torch.zeros_like(xx), torch.full_like(xx, v)], 1), x, t)
        w = (v + 1) / 2
        want = w * np.log(SMALL_BETAS) + (1 - w) * lo
        np.testing.assert_allclose(out["log_variance"].flatten().double().numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(out["variance"].flatten().double().numpy(), np.exp(want), rtol=1e-6)



def ref_vb_bits(d, x0, xt, out, t):
    """Float64 numpy L_t in bits/dim (KL for t > 0, discretized NLL at t = 0 with improved-diffusion's tanh form
    of Φ, probabilities floored at 1e-12), no clipping."""
    mean, log_var, _ = ref_p_mean_variance(d, out, xt, t, clip=False)
    return vb_bits_of(d, x0, xt, mean, log_var, t)


def vb_bits_of(d, x0, xt, mean, log_var, t):
    """L_t in bits/dim of p(x_{t-1} | x_t) = N(mean, exp(log_var)) (float64 numpy arrays shaped like x0)."""
    g = lambda arr: arr[t.numpy()][:, None, None, None]
    x0n, xtn = x0.double().numpy(), xt.double().numpy()
    true_mean = g(d.posterior_mean_coef1) * x0n + g(d.posterior_mean_coef2) * xtn
    true_lv = g(d.posterior_log_variance_clipped)
    kl = 0.5 * (-1 + log_var - true_lv + np.exp(true_lv - log_var) + (true_mean - mean) ** 2 * np.exp(-log_var))
    phi = lambda y: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    s = np.exp(0.5 * log_var)
    cp, cm = phi((x0n - mean + 1 / 255) / s), phi((x0n - mean - 1 / 255) / s)
    lp = np.log(np.maximum(np.where(x0n < -0.999, cp, np.where(x0n > 0.999, 1 - cm, cp - cm)), 1e-12))
    return np.where(t.numpy() == 0, -lp.mean(axis=(1, 2, 3)), kl.mean(axis=(1, 2, 3))) / math.log(2)


def test_training_losses_by_hand():
    """x_t = sqrt(ᾱ) x_0 + sqrt(1−ᾱ) ε is what the network sees, at the original timestep; mse = mean (ε − ε̂)²,
    vb = L_t in bits/dim, loss = mse + vb_scale · vb; learn_sigma=False has vb = 0."""
    base = GaussianDiffusion(np.linspace(0.05, 0.4, 6), vb_scale=2.5)
    d = base.respace(3)                                    # kept 0, 2, 5
    g = torch.Generator().manual_seed(4)
    x0 = torch.randint(0, 256, (3, 2, 2, 2), generator=g).float() / 127.5 - 1
    x0[0, 0, 0, 0], x0[0, 1, 1, 1] = -1.0, 1.0            # both edge bins at t = 0
    noise = torch.randn(3, 2, 2, 2, generator=g)
    out = torch.randn(3, 4, 2, 2, generator=g) * 0.2
    t = torch.tensor([0, 1, 2])
    seen = {}

    def model(x, tt):
        seen.update(x=x.clone(), t=tt.tolist())
        return out.double()                                 # the loss must come back in float32
    losses = d.training_losses(model, x0, t, noise=noise)
    a = d.alphas_cumprod[t.numpy()][:, None, None, None]
    xt = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * noise.double().numpy()
    np.testing.assert_allclose(seen["x"].double().numpy(), xt, rtol=1e-5, atol=1e-6)
    assert seen["t"] == [0, 2, 5]
    mse = ((noise.double() - out[:, :2].double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    vb = ref_vb_bits(d, x0, torch.from_numpy(xt).float(), out, t)
    assert losses["loss"].dtype == torch.float32
    np.testing.assert_allclose(losses["mse"].double().numpy(), mse, rtol=1e-5)
    np.testing.assert_allclose(losses["vb"].double().numpy(), vb, rtol=1e-4)
    np.testing.assert_allclose(losses["loss"].double().numpy(), mse + 2.5 * vb, rtol=1e-4)
    fixed = GaussianDiffusion(base.betas, learn_sigma=False).respace(3)
    plain = fixed.training_losses(lambda x, tt: out[:, :2], x0, t, noise=noise)
    np.testing.assert_allclose(plain["mse"].double().numpy(), mse, rtol=1e-5)
    assert plain["vb"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(plain["loss"], plain["mse"], rtol=0, atol=0)


def test_vb_terms_with_a_model_and_no_clipping_by_default():
    d = GaussianDiffusion(SMALL_BETAS)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randint(0, 256, (3, 2, 2, 2), generator=g).float() / 127.5 - 1
    xt = torch.randn(3, 2, 2, 2, generator=g) * torch.tensor([0.3, 3.0, 3.0]).view(3, 1, 1, 1)   # x̂_0 beyond ±1 at t > 0
    out = torch.randn(3, 4, 2, 2, generator=g) * 0.3
    t = torch.tensor([0, 1, 2])
    got = d.vb_terms_bpd(x0, xt, t, model=lambda x, tt: out)
    assert not torch.allclose(d.vb_terms_bpd(x0, xt, t, model=lambda x, tt: out, clip_denoised=True)[1:], got[1:])
    np.testing.assert_allclose(got.double().numpy(), ref_vb_bits(d, x0, xt, out, t), rtol=1e-4)


def test_ddim_reverse_step_by_hand():
    """x_{t+1} = sqrt(ᾱ_{t+1}) x̂_0 + sqrt(1−ᾱ_{t+1}) ε̂ (η = 0), x̂_0 not clipped by default; at t = T−1 ᾱ_next = 0."""
    d = GaussianDiffusion(SMALL_BETAS, learn_sigma=False)
    a, _ = small_abar()
    a_next = np.array([a[1], a[2], 0.0])
    x = torch.tensor([2.5, -0.3, 0.7]).view(3, 1, 1, 1)
    e = -0.4
    got = d.ddim_reverse_sample(lambda xx, tt: torch.full_like(xx, e), x, torch.tensor([0, 1, 2]))
    xn = np.array([2.5, -0.3, 0.7])
    x0 = (xn - np.sqrt(1 - a) * e) / np.sqrt(a)
    np.testing.assert_allclose(got.flatten().double().numpy(), np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * e,
                               rtol=1e-5)
    seen = []

    def model(xx, tt):
        seen.append(tt.tolist())
        return torch.full_like(xx, e)
    z = d.ddim_reverse_loop(model, x[:1], 2)
    assert seen == [[0], [1]]
    x1 = np.sqrt(a[1]) * x0[0] + np.sqrt(1 - a[1]) * e
    np.testing.assert_allclose(z.item(), math.sqrt(a[2]) * (x1 - math.sqrt(1 - a[1]) * e) / math.sqrt(a[1])
                               + math.sqrt(1 - a[2]) * e, rtol=1e-5)


def test_ancestral_loop_by_hand_with_its_generator():
    """x_2 ~ N(0, I) from the generator, then x_{t−1} = μ(x_t) + sqrt(Σ_t) z_t with a fresh draw for t = 2, 1 and
    none at t = 0 (three draws in all), Σ = (β̃_1, β_1, β_2); a constant ε̂ = e, x̂_0 clamped to [−1, 1]."""
    d = GaussianDiffusion(SMALL_BETAS, learn_sigma=False)
    a, a_prev = small_abar()
    var = np.array([(SMALL_BETAS * (1 - a_prev) / (1 - a))[1], 0.2, 0.3])
    e, shape = 0.25, (2, 1, 2, 1)
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.full_like(x, e)
    gen = torch.Generator().manual_seed(7)
    got = d.p_sample_loop(model, shape, generator=gen)
    after = torch.randn(1, generator=gen)
    replay = torch.Generator().manual_seed(7)
    draws = [torch.randn(*shape, generator=replay).double().numpy() for _ in range(3)]
    x = draws[0]
    for t, z in zip((2, 1, 0), (draws[1], draws[2], 0.0)):
        x0 = np.clip((x - math.sqrt(1 - a[t]) * e) / math.sqrt(a[t]), -1, 1)
        mean = (SMALL_BETAS[t] * math.sqrt(a_prev[t]) * x0 + (1 - a_prev[t]) * math.sqrt(1 - SMALL_BETAS[t]) * x) \
            / (1 - a[t])
        x = mean + math.sqrt(var[t]) * z
    np.testing.assert_allclose(got.double().numpy(), x, rtol=1e-5, atol=1e-6)
    assert seen == [[2, 2], [1, 1], [0, 0]] and got.device.type == "cpu"
    assert after.item() == torch.randn(1, generator=replay).item()      # exactly three draws


def test_ddim_loop_by_hand_with_per_step_eta():
    """η_t from a function of the index: a draw only where η_t > 0 (after the starting noise); σ_t per [DDIM eq. 16];
    x̂_0 clamped to [−1, 1]; t_start picks the first index."""
    d = GaussianDiffusion(SMALL_BETAS, learn_sigma=False)
    a, a_prev = small_abar()
    e, shape = -0.2, (2, 1, 1, 2)
    etas = {2: 0.7, 1: 0.0, 0: 0.5}
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.full_like(x, e)

    def ref(x, steps, draws):
        for t in steps:
            x0 = np.clip((x - math.sqrt(1 - a[t]) * e) / math.sqrt(a[t]), -1, 1)
            eps = (x - math.sqrt(a[t]) * x0) / math.sqrt(1 - a[t])
            sigma = etas[t] * math.sqrt((1 - a_prev[t]) / (1 - a[t])) * math.sqrt(1 - a[t] / a_prev[t])
            x = math.sqrt(a_prev[t]) * x0 + math.sqrt(1 - a_prev[t] - sigma ** 2) * eps \
                + (sigma * draws.pop(0) if t > 0 and etas[t] > 0 else 0)
        return x
    gen = torch.Generator().manual_seed(8)
    got = d.ddim_sample_loop(model, shape, eta=lambda i: etas[i], generator=gen)
    after = torch.randn(1, generator=gen)
    replay = torch.Generator().manual_seed(8)
    draws = [torch.randn(*shape, generator=replay).double().numpy() for _ in range(3)]   # start, η_2, η_0
    np.testing.assert_allclose(got.double().numpy(), ref(draws[0], (2, 1, 0), draws[1:2]), rtol=1e-5, atol=1e-6)
    assert after.item() == torch.randn(1, generator=replay).item()
    assert seen == [[2, 2], [1, 1], [0, 0]]
    seen.clear()
    start = torch.tensor([[0.3, -0.9], [1.4, 0.1]]).view(shape)
    got = d.ddim_sample_loop(model, shape, noise=start, t_start=1, eta=0.0)
    etas.update({1: 0.0, 0: 0.0})
    np.testing.assert_allclose(got.double().numpy(), ref(start.double().numpy(), (1, 0), []), rtol=1e-5, atol=1e-6)
    assert seen == [[1, 1], [0, 0]]


def test_samplers_cast_a_float64_guidance_gradient():
    d = GaussianDiffusion(SMALL_BETAS)
    x, t = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    model = lambda xx, tt: torch.cat([torch.full_like(xx, 0.1), torch.zeros_like(xx)], 1)
    grad = lambda xx, tt: torch.ones(xx.shape, dtype=torch.float64)
    assert d.p_sample(model, x, t, cond_fn=grad)["sample"].dtype == torch.float32
    assert d.ddim_sample(model, x, t, cond_fn=grad)["sample"].dtype == torch.float32


def test_float32_betas_are_promoted_and_a_two_step_chain_clips_with_posterior_variance_1():
    b32 = np.array([0.1, 0.2], dtype=np.float32)
    d = GaussianDiffusion(b32)
    b = b32.astype(np.float64)                       # the float32 values, then float64 arithmetic
    assert d.betas.dtype == d.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(d.alphas_cumprod, [1 - b[0], (1 - b[0]) * (1 - b[1])], rtol=1e-15)
    post1 = b[1] * b[0] / (1 - (1 - b[0]) * (1 - b[1]))          # β̃_1 = β_1 (1 − ᾱ_0)/(1 − ᾱ_1), ᾱ_0 = 1 − β_0
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log([post1, post1]), rtol=1e-14)


def test_learned_sigma_needs_twice_the_channels():
    d = GaussianDiffusion(SMALL_BETAS)
    with pytest.raises(AssertionError, match=r"^learn_sigma needs 4 output channels, got 3$"):
        d.p_mean_variance(None, torch.zeros(1, 2, 5, 5), torch.tensor([1]), model_output=torch.zeros(1, 3, 5, 5))


def test_model_kwargs_reach_the_network_from_every_entry_point():
    """A network that needs its label y: every sampler/loss forwards model_kwargs, giving the same result as the
    same network with y bound in advance."""
    g = torch.Generator().manual_seed(9)
    x0, x = torch.rand(2, 1, 2, 2, generator=g) - 0.5, torch.randn(2, 1, 2, 2, generator=g)
    y = torch.tensor([0.3, -0.2])

    def net(xx, tt, y):
        return torch.cat([0.5 * xx + y.view(-1, 1, 1, 1), 0.1 * xx], 1)
    bound = lambda xx, tt: net(xx, tt, y)
    kw = dict(y=y)
    d = GaussianDiffusion(SMALL_BETAS)
    t = torch.tensor([1, 2])
    pairs = [
        (d.p_mean_variance(net, x, t, model_kwargs=kw)["mean"], d.p_mean_variance(bound, x, t)["mean"]),
        (d.p_sample(net, x, t, model_kwargs=kw, noise=x)["sample"], d.p_sample(bound, x, t, noise=x)["sample"]),
        (d.ddim_sample(net, x, t, model_kwargs=kw)["sample"], d.ddim_sample(bound, x, t)["sample"]),
        (d.ddim_reverse_sample(net, x, t, model_kwargs=kw), d.ddim_reverse_sample(bound, x, t)),
        (d.ddim_reverse_loop(net, x0, 2, model_kwargs=kw), d.ddim_reverse_loop(bound, x0, 2)),
        (d.training_losses(net, x0, t, noise=x, model_kwargs=kw)["loss"], d.training_losses(bound, x0, t, noise=x)["loss"]),
        (d.p_sample_loop(net, x.shape, noise=x, model_kwargs=kw, generator=torch.Generator().manual_seed(1)),
         d.p_sample_loop(bound, x.shape, noise=x, generator=torch.Generator().manual_seed(1))),
        (d.ddim_sample_loop(net, x.shape, noise=x, model_kwargs=kw), d.ddim_sample_loop(bound, x.shape, noise=x)),
    ]
    for i, (got, want) in enumerate(pairs):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(i))


def test_progress_bar_only_when_asked(capsys, monkeypatch):
    import threading
    from tqdm import tqdm
    # no monitor thread, and a lock private to this process (tqdm's default one is shared with forked processes)
    monkeypatch.setattr(tqdm, "monitor_interval", 0)
    monkeypatch.setattr(tqdm, "_lock", threading.RLock(), raising=False)
    d = GaussianDiffusion(SMALL_BETAS)
    model = lambda xx, tt: torch.zeros(xx.shape[0], 2, *xx.shape[2:])
    noise = torch.randn(1, 1, 2, 2)
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        plain = loop(model, noise.shape, noise=noise.clone(), generator=torch.Generator().manual_seed(0))
        assert capsys.readouterr().err == ""
        shown = loop(model, noise.shape, noise=noise.clone(), generator=torch.Generator().manual_seed(0), progress=True)
        err = capsys.readouterr().err
        assert torch.equal(plain, shown)
        assert "sampling:" in err and "XX" not in err and "/3 [" in err
        import re
        assert re.search(r"[\d?]step/s|s/step", err), err


def test_clipping_switches_by_hand():
    """ddim_reverse_* clip x̂_0 only when asked; ddim_sample and p_sample clip by default; p_sample also returns x̂_0."""
    d = GaussianDiffusion(SMALL_BETAS, learn_sigma=False)
    a, a_prev = small_abar()
    e, xv = -0.4, np.array([2.5, -2.0, 0.7])
    x = torch.from_numpy(xv).float().view(3, 1, 1, 1)
    t = torch.tensor([0, 1, 2])
    model = lambda xx, tt: torch.full_like(xx, e)
    x0 = np.clip((xv - np.sqrt(1 - a) * e) / np.sqrt(a), -1, 1)
    eps = (xv - np.sqrt(a) * x0) / np.sqrt(1 - a)
    a_next = np.array([a[1], a[2], 0.0])
    got = d.ddim_reverse_sample(model, x, t, clip_denoised=True).flatten().double().numpy()
    np.testing.assert_allclose(got, np.sqrt(a_next) * x0 + np.sqrt(1 - a_next) * eps, rtol=1e-5)
    z = d.ddim_reverse_loop(model, x[:1], 1, clip_denoised=True).item()
    assert z == pytest.approx(math.sqrt(a[1]) * x0[0] + math.sqrt(1 - a[1]) * eps[0], rel=1e-5)
    got = d.ddim_sample(model, x, t)
    np.testing.assert_allclose(got["sample"].flatten().double().numpy(), np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps,
                               rtol=1e-5, atol=1e-6)
    got = d.p_sample(model, x, t, noise=torch.zeros_like(x))
    np.testing.assert_allclose(got["pred_x0"].flatten().double().numpy(), x0, rtol=1e-6)
    mean = (SMALL_BETAS * np.sqrt(a_prev) * x0 + (1 - a_prev) * np.sqrt(1 - SMALL_BETAS) * xv) / (1 - a)
    np.testing.assert_allclose(got["sample"].flatten().double().numpy(), mean, rtol=1e-5)


def test_ancestral_loop_starts_from_the_given_noise_and_training_draws_its_own():
    d = GaussianDiffusion(SMALL_BETAS, learn_sigma=False)
    a, a_prev = small_abar()
    var = np.array([(SMALL_BETAS * (1 - a_prev) / (1 - a))[1], 0.2, 0.3])
    start = torch.tensor([0.4, -1.3]).view(2, 1, 1, 1)
    gen = torch.Generator().manual_seed(11)
    got = d.p_sample_loop(lambda xx, tt: torch.zeros_like(xx), start.shape, noise=start, generator=gen,
                          clip_denoised=False)
    replay = torch.Generator().manual_seed(11)
    x = start.double().numpy()
    for t in (2, 1, 0):                      # ε̂ = 0: μ = x_t / sqrt(α_t)
        x = x / math.sqrt(1 - SMALL_BETAS[t]) + (math.sqrt(var[t]) * torch.randn(2, 1, 1, 1, generator=replay).double()
                                                 .numpy() if t > 0 else 0)
    np.testing.assert_allclose(got.double().numpy(), x, rtol=1e-5)
    x0, t = torch.full((2, 1, 1, 1), 0.5), torch.tensor([1, 2])
    torch.manual_seed(12)
    losses = GaussianDiffusion(SMALL_BETAS, learn_sigma=False).training_losses(lambda xx, tt: torch.zeros_like(xx), x0, t)
    torch.manual_seed(12)
    noise = torch.randn(2, 1, 1, 1).double().flatten().numpy()
    np.testing.assert_allclose(losses["mse"].double().numpy(), noise ** 2, rtol=1e-6)


def test_loops_pass_guide_at_and_clip_denoised_on():
    """p_sample_loop(guide_at="mean") asks cond_fn at x_{t-1}'s index (0 at the last step); ddim_sample_loop with
    clip_denoised=False keeps x̂_0 = (x − sqrt(1−ᾱ) e)/sqrt(ᾱ) beyond ±1
    (η = 0: x_{t−1} = sqrt(ᾱ_{t−1}) x̂_0 + sqrt(1−ᾱ_{t−1}) e)."""
    d = GaussianDiffusion(SMALL_BETAS, learn_sigma=False)
    seen = []

    def cond_fn(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)
    model = lambda xx, tt: torch.zeros_like(xx)
    d.p_sample_loop(model, (1, 1, 1, 1), cond_fn=cond_fn, guide_at="mean", generator=torch.Generator().manual_seed(0))
    assert seen == [[1], [0], [0]]
    a, a_prev = small_abar()
    e = 0.3
    start = torch.tensor([2.0]).view(1, 1, 1, 1)
    got = d.ddim_sample_loop(lambda xx, tt: torch.full_like(xx, e), start.shape, noise=start, clip_denoised=False)
    x0 = (2.0 - math.sqrt(1 - a[2]) * e) / math.sqrt(a[2])            # 2.4 > 1, and then constant along the chain
    assert x0 > 1 and got.item() == pytest.approx(x0, rel=1e-5)      # ᾱ_{-1} = 1: the last step returns x̂_0
