"""ddpm.py against closed forms, invariants and the reference values of docs/paper_notes.md §1 (computed there
from the official/improved-diffusion code). The `ref_*` helpers are an independent float64 numpy
transcription of improved-diffusion's formulas, used as the oracle on random inputs."""
import math

import numpy as np
import pytest
import torch

from ddpm import (GaussianDiffusion, DiffusionConfig, cosine_betas, discretized_gaussian_log_likelihood, linear_betas,
                  normal_kl, space_timesteps)

T = 4000


@pytest.fixture(scope="module")
def diffusion():
    return DiffusionConfig(diffusion_steps=T).build()


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
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
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
    t = torch.tensor([0, 1, 2, d.num_timesteps // 2, d.num_timesteps - 2, d.num_timesteps - 1])
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
    d4 = GaussianDiffusion(diffusion.betas, vb_scale=T / 1000)
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


def ref_space_timesteps(num_timesteps, section_counts):
    """Oracle: improved-diffusion's `space_timesteps` (improved_diffusion/respace.py), restated. "ddimN": the
    first integer stride s >= 1 with len(range(0, T, s)) == N, else ValueError. Otherwise T is cut into
    len(counts) sections (the first T mod len one step longer); a section of `size` keeps, for its count c, the
    positions round(x) with x starting at 0.0 and growing by (size-1)/(c-1) (by 1 when c <= 1) after each one."""
    if section_counts.startswith("ddim"):
        want = int(section_counts[4:])
        strides = [s for s in range(1, num_timesteps) if len(range(0, num_timesteps, s)) == want]
        if not strides:
            raise ValueError(want)
        return list(range(0, num_timesteps, strides[0]))
    counts = [int(c) for c in section_counts.split(",")]
    kept, offset = set(), 0
    for n, c in enumerate(counts):
        size = num_timesteps // len(counts) + (n < num_timesteps % len(counts))
        if size < c:
            raise ValueError(c)
        step, x = (size - 1) / (c - 1) if c > 1 else 1, 0.0
        for _ in range(c):
            kept.add(offset + round(x))
            x = x + step
        offset += size
    return sorted(kept)


@pytest.mark.parametrize("num_timesteps", [1000, 4000])
def test_space_timesteps_equals_improved_diffusion_for_every_count(num_timesteps):
    """Every K in 2..T gives the reference's indices (K = 21 of T = 1000 once differed at a rounding tie:
    round(10·49.95) = 500 but the accumulated x is 499.4999...); K = 1 keeps T-1 by design (see the docstring)."""
    differ = [k for k in range(2, num_timesteps + 1)
              if space_timesteps(num_timesteps, k) != ref_space_timesteps(num_timesteps, str(k))]
    assert differ == []
    assert space_timesteps(1000, 21)[10] == ref_space_timesteps(1000, "21")[10] == 499
    assert space_timesteps(num_timesteps, 1) == space_timesteps(num_timesteps, "1") == [num_timesteps - 1]
    assert ref_space_timesteps(num_timesteps, "1") == [0]


@pytest.mark.parametrize("num_timesteps", [1000, 4000, 37])
def test_space_timesteps_sections_and_ddim_equal_improved_diffusion(num_timesteps):
    rng = np.random.default_rng(num_timesteps)
    specs = ["10,15,20", "1,1", "1,2,3", "3,1", f"{num_timesteps // 2},{num_timesteps - num_timesteps // 2}", "2,2,2,2,2"]
    for _ in range(40):
        n = int(rng.integers(2, 6))
        specs.append(",".join(str(int(rng.integers(1, num_timesteps // n + 1))) for _ in range(n)))
    ddim = range(1, num_timesteps + 1) if num_timesteps < 4000 else [1, 2, 3, 64, 250, 1333, 1334, 2000, 3999, 4000]
    for spec in specs + [f"ddim{k}" for k in ddim]:
        try:
            want = ref_space_timesteps(num_timesteps, spec)
        except ValueError:             # the reference refuses it: so must we
            with pytest.raises(ValueError, match="evenly strided|cannot divide"):
                space_timesteps(num_timesteps, spec)
        else:
            assert space_timesteps(num_timesteps, spec) == want, spec
    for bad in ("0", f"{num_timesteps + 1}", f"1,{num_timesteps}"):
        with pytest.raises(ValueError, match="cannot divide"):
            space_timesteps(num_timesteps, bad)


def test_one_step_chain_denoises_from_pure_noise_in_one_step():
    """K = 1: the step from T-1 to 0. ᾱ_prev = 1, so β̃ = 0 and q(x_{-1} | x_t, x_0) has mean x_0 (coef1 = 1,
    coef2 = 0): the sample is the clipped x̂_0, for ancestral, DDIM (σ = 0 since ᾱ_prev = 1) and the fixed
    variances; the log variance standing in for log β̃_1 is log β_0, finite."""
    base = GaussianDiffusion(np.full(10, 0.05))           # ᾱ_9 = 0.95^10 = 0.599: x̂_0 is well conditioned in float32
    for learn_sigma, small in [(True, False), (False, False), (False, True)]:
        d = GaussianDiffusion(base.betas, learn_sigma=learn_sigma, sigma_small=small).respace(1)
        assert d.num_timesteps == 1 and d.timestep_map.tolist() == [9]
        np.testing.assert_allclose(d.betas, [1 - 0.95 ** 10], rtol=1e-12)
        assert d.alphas_cumprod_prev.tolist() == [1.0] and d.posterior_variance.tolist() == [0.0]
        np.testing.assert_allclose([d.posterior_mean_coef1[0], d.posterior_mean_coef2[0]], [1.0, 0.0], atol=1e-15)
        np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log(d.betas), rtol=1e-12)
        x_star = torch.rand(1, 3, 4, 4) * 1.6 - 0.8
        exact = point_mass_model(base, x_star)
        model = exact if learn_sigma else (lambda x, t: exact(x, t)[:, :3])
        gen = torch.Generator().manual_seed(0)
        for sample in (d.p_sample_loop(model, (2, 3, 4, 4), generator=gen),
                       d.ddim_sample_loop(model, (2, 3, 4, 4), generator=gen),
                       d.ddim_sample_loop(model, (2, 3, 4, 4), generator=gen, eta=1.0)):
            torch.testing.assert_close(sample, x_star.expand(2, -1, -1, -1), atol=1e-5, rtol=0)


def test_inversion_fraction_maps_into_the_reachable_latents():
    """x_0 is index 0 and t_stop reverse steps reach index t_stop, so the latents are 1..K-1: t_fraction = 1 is
    K-1 (original T-1), tiny fractions are 1, and a one-step chain has none."""
    from appendix.inversion import inversion_index
    for k in range(2, 300):
        assert inversion_index(1.0, k) == k - 1
        assert inversion_index(1e-9, k) == 1
        assert all(1 <= inversion_index(f, k) <= k - 1 for f in np.linspace(1e-6, 1, 101))
    assert [inversion_index(0.5, k) for k in (2, 3, 4, 64, 250)] == [1, 1, 2, 32, 124]   # round(f·(K-1)), half-even
    for f, k in [(0.5, 1), (1.0, 1), (0.0, 10), (1.5, 10), (-0.1, 10)]:
        with pytest.raises(ValueError, match="--sample-steps|--t-fraction"):
            inversion_index(f, k)


def test_inversion_to_the_whole_chain_reaches_the_last_kept_timestep_and_decodes_back():
    """A constant ε-predictor e makes DDIM exact [DDIM eq. 12, η = 0]: every step keeps x̂_0 = c and moves to
    sqrt(ᾱ_j) c + sqrt(1-ᾱ_j) e. The data is read as x at index 0 (improved-diffusion's convention), so
    c = (x_0 - sqrt(1-ᾱ_0) e) / sqrt(ᾱ_0); t_fraction = 1 must reach the original ᾱ_{T-1} and decode back to c."""
    from appendix.inversion import decode, invert, inversion_index
    base = GaussianDiffusion(np.full(40, 0.02))           # ᾱ_39 = 0.98^40 = 0.446: well conditioned in float32
    d = base.respace(8)
    torch.manual_seed(0)
    e, x0 = torch.randn(1, 3, 4, 4) * 0.5, torch.rand(2, 3, 4, 4) * 1.2 - 0.6   # c stays inside the clip to [-1, 1]
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.cat([e.expand_as(x), torch.zeros_like(x)], dim=1)

    t_stop = inversion_index(1.0, d.num_timesteps)
    assert t_stop == 7 and d.timestep_map[t_stop] == 39
    z = invert(d, model, x0, t_stop)
    a0, a = base.alphas_cumprod[0], base.alphas_cumprod[39]
    c = (x0 - math.sqrt(1 - a0) * e) / math.sqrt(a0)
    assert c.abs().max() < 1
    torch.testing.assert_close(z, math.sqrt(a) * c + math.sqrt(1 - a) * e, atol=1e-5, rtol=0)
    assert [s[0] for s in seen] == d.timestep_map[:7].tolist()
    seen.clear()
    torch.testing.assert_close(decode(d, model, z, t_stop), c, atol=1e-5, rtol=0)
    assert [s[0] for s in seen] == d.timestep_map[::-1].tolist()
    for bad in (0, 8):
        with pytest.raises(ValueError, match=r"outside 1\.\.7"):
            invert(d, model, x0, bad)


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
    base = DiffusionConfig(diffusion_steps=1000).build()
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
    torch.testing.assert_close(a, diffusion.p_mean_variance(model, x, t)["mean"], rtol=0, atol=0)   # the mean alone
