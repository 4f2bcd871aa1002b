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


@pytest.mark.parametrize("num_steps", [1000, 4000])
def test_space_timesteps_equals_improved_diffusion_for_every_count(num_steps):
    """Every K in 2..T gives the reference's indices (K = 21 of T = 1000 once differed at a rounding tie:
    round(10·49.95) = 500 but the accumulated x is 499.4999...); K = 1 keeps T-1 by design (see the docstring)."""
    differ = [k for k in range(2, num_steps + 1)
              if space_timesteps(num_steps, k) != ref_space_timesteps(num_steps, str(k))]
    assert differ == []
    assert space_timesteps(1000, 21)[10] == ref_space_timesteps(1000, "21")[10] == 499
    assert space_timesteps(num_steps, 1) == space_timesteps(num_steps, "1") == [num_steps - 1]
    assert ref_space_timesteps(num_steps, "1") == [0]


@pytest.mark.parametrize("num_steps", [1000, 4000, 37])
def test_space_timesteps_sections_and_ddim_equal_improved_diffusion(num_steps):
    rng = np.random.default_rng(num_steps)
    specs = ["10,15,20", "1,1", "1,2,3", "3,1", f"{num_steps // 2},{num_steps - num_steps // 2}", "2,2,2,2,2"]
    for _ in range(40):
        n = int(rng.integers(2, 6))
        specs.append(",".join(str(int(rng.integers(1, num_steps // n + 1))) for _ in range(n)))
    ddim = range(1, num_steps + 1) if num_steps < 4000 else [1, 2, 3, 64, 250, 1333, 1334, 2000, 3999, 4000]
    for spec in specs + [f"ddim{k}" for k in ddim]:
        try:
            want = ref_space_timesteps(num_steps, spec)
        except ValueError:             # the reference refuses it: so must we
            with pytest.raises(ValueError, match="evenly strided|cannot divide"):
                space_timesteps(num_steps, spec)
        else:
            assert space_timesteps(num_steps, spec) == want, spec
    for bad in ("0", f"{num_steps + 1}", f"1,{num_steps}"):
        with pytest.raises(ValueError, match="cannot divide"):
            space_timesteps(num_steps, bad)


def test_one_step_chain_denoises_from_pure_noise_in_one_step():
    """K = 1: the step from T-1 to 0. ᾱ_prev = 1, so β̃ = 0 and q(x_{-1} | x_t, x_0) has mean x_0 (coef1 = 1,
    coef2 = 0): the sample is the clipped x̂_0, for ancestral, DDIM (σ = 0 since ᾱ_prev = 1) and the fixed
    variances; the log variance standing in for log β̃_1 is log β_0, finite."""
    base = Diffusion(np.full(10, 0.05))           # ᾱ_9 = 0.95^10 = 0.599: x̂_0 is well conditioned in float32
    for learn_sigma, small in [(True, False), (False, False), (False, True)]:
        d = Diffusion(base.betas, learn_sigma=learn_sigma, sigma_small=small).respace(1)
        assert d.num_steps == 1 and d.timestep_map.tolist() == [9]
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
    from inversion import inversion_index
    for k in range(2, 300):
        assert inversion_index(1.0, k) == k - 1
        assert inversion_index(1e-9, k) == 1
        assert all(1 <= inversion_index(f, k) <= k - 1 for f in np.linspace(1e-6, 1, 101))
    assert [inversion_index(0.5, k) for k in (2, 3, 4, 64, 250)] == [1, 1, 2, 32, 124]   # round(f·(K-1)), half-even
    for f, k in [(0.5, 1), (1.0, 1), (0.0, 10), (1.5, 10), (-0.1, 10)]:
        with pytest.raises(ValueError, match="--steps|--t-fraction"):
            inversion_index(f, k)


def test_inversion_to_the_whole_chain_reaches_the_last_kept_timestep_and_decodes_back():
    """A constant ε-predictor e makes DDIM exact [DDIM eq. 12, η = 0]: every step keeps x̂_0 = c and moves to
    sqrt(ᾱ_j) c + sqrt(1-ᾱ_j) e. The data is read as x at index 0 (improved-diffusion's convention), so
    c = (x_0 - sqrt(1-ᾱ_0) e) / sqrt(ᾱ_0); t_fraction = 1 must reach the original ᾱ_{T-1} and decode back to c."""
    from inversion import decode, invert, inversion_index
    base = Diffusion(np.full(40, 0.02))           # ᾱ_39 = 0.98^40 = 0.446: well conditioned in float32
    d = base.respace(8)
    torch.manual_seed(0)
    e, x0 = torch.randn(1, 3, 4, 4) * 0.5, torch.rand(2, 3, 4, 4) * 1.2 - 0.6   # c stays inside the clip to [-1, 1]
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.cat([e.expand_as(x), torch.zeros_like(x)], dim=1)

    t_stop = inversion_index(1.0, d.num_steps)
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
    torch.testing.assert_close(a, diffusion.p_mean_variance(model, x, t)["mean"], rtol=0, atol=0)   # the mean alone


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
    d = Diffusion(SMALL_BETAS)
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
    assert d.timestep_map.tolist() == [0, 1, 2] and d.num_steps == 3 and d.dc_prior is None
    assert (d.learn_sigma, d.sigma_small, d.vb_scale) == (True, False, 1.0)


def test_betas_must_lie_in_the_half_open_unit_interval():
    with np.errstate(divide="ignore"):
        Diffusion(np.array([0.5, 1.0]))                       # β = 1 is allowed (ᾱ reaches 0)
    for bad in ([0.0, 0.5], [0.5, 1.0 + 1e-9], [-0.1, 0.5], [[0.1, 0.2]]):
        with pytest.raises(AssertionError, match=r"^betas must lie in \(0, 1\]$"):
            Diffusion(np.array(bad))


def test_config_defaults_and_build():
    c = DiffusionConfig()
    assert (c.num_steps, c.schedule, c.learn_sigma, c.sigma_small, c.vb_scale) == (4000, "cosine", True, False, 1.0)
    d = DiffusionConfig(num_steps=100, schedule="linear", learn_sigma=False, sigma_small=True, vb_scale=2.5).build()
    np.testing.assert_allclose(d.betas, np.linspace(1e-3, 0.2, 100), rtol=1e-12)   # 1000/100 · (1e-4 .. 0.02)
    assert (d.learn_sigma, d.sigma_small, d.vb_scale) == (False, True, 2.5)
    np.testing.assert_allclose(DiffusionConfig(num_steps=10).build().betas, cosine_betas(10), rtol=0)


def test_cosine_betas_by_hand_for_two_steps():
    """T = 2: f(u) = cos²((u + s)/(1 + s) · π/2); β_0 = 1 − f(½)/f(0), β_1 = 1 − f(1)/f(½) = 1 clipped to 0.999."""
    s = 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    np.testing.assert_allclose(cosine_betas(2), [1 - f(0.5) / f(0), 0.999], rtol=1e-14)
    np.testing.assert_allclose(cosine_betas(2, s=0.1, max_beta=0.99),
                               [1 - math.cos(0.6 / 1.1 * math.pi / 2) ** 2 / math.cos(0.1 / 1.1 * math.pi / 2) ** 2,
                                0.99], rtol=1e-14)


def test_respace_and_dc_prior_keep_every_setting():
    d = Diffusion(np.linspace(0.01, 0.3, 9), learn_sigma=False, sigma_small=True, vb_scale=2.5)
    r = d.respace(3)
    assert (r.learn_sigma, r.sigma_small, r.vb_scale) == (False, True, 2.5)
    assert r.timestep_map.tolist() == [0, 4, 8]
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[[0, 4, 8]], rtol=1e-14)
    c = r.with_dc_prior([0.1, 0.2], [0.3, 0.4])
    assert (c.learn_sigma, c.sigma_small, c.vb_scale) == (False, True, 2.5)
    assert c.timestep_map.tolist() == [0, 4, 8] and c.dc_prior[0].dtype == np.float64
    np.testing.assert_allclose(c.betas, r.betas, rtol=0)
    np.testing.assert_allclose(c.dc_prior, [[0.1, 0.2], [0.3, 0.4]])
    rr = c.respace(2)
    assert rr.timestep_map.tolist() == [0, 8] and (rr.learn_sigma, rr.sigma_small, rr.vb_scale) == (False, True, 2.5)
    np.testing.assert_allclose(rr.dc_prior, [[0.1, 0.2], [0.3, 0.4]])


@pytest.mark.parametrize("sigma_small", [False, True])
def test_fixed_variances_by_hand(sigma_small):
    """learn_sigma=False: Σ = β̃_t (sigma_small, log clipped at t = 0 to log β̃_1) or β_t with β_0 → β̃_1 [DDPM 3.2];
    the mean is the posterior mean at x̂_0 = (x_t − sqrt(1−ᾱ) ε̂)/sqrt(ᾱ), clamped to [−1, 1] by default."""
    d = Diffusion(SMALL_BETAS, learn_sigma=False, sigma_small=sigma_small)
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
    d = Diffusion(SMALL_BETAS)
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


def test_dc_corrected_eps_by_hand():
    """ε̂ − DC(ε̂) + g (u − sqrt(ᾱ) m), g = sqrt(1−ᾱ)/n / (ᾱ s² + (1−ᾱ)/n), per image and channel; n = H·W."""
    d = Diffusion(SMALL_BETAS).with_dc_prior([0.2, -0.1], [0.05, 0.0])
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 2, 2, 3, generator=g), torch.randn(2, 2, 2, 3, generator=g)
    t = torch.tensor([1, 2])
    got = d.dc_corrected_eps(x, t, eps).double().numpy()
    a, _ = small_abar()
    xn, en = x.double().numpy(), eps.double().numpy()
    want = np.empty_like(en)
    for i, ti in enumerate([1, 2]):
        for c, (m, s2) in enumerate([(0.2, 0.05), (-0.1, 0.0)]):
            n, ab = 6, a[ti]
            gain = math.sqrt(1 - ab) / n / (ab * s2 + (1 - ab) / n)
            want[i, c] = en[i, c] - en[i, c].mean() + gain * (xn[i, c].mean() - math.sqrt(ab) * m)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    out = d.p_mean_variance(lambda xx, tt: torch.cat([eps, torch.zeros_like(eps)], 1), x, t, clip_denoised=False)
    np.testing.assert_allclose(out["eps"].double().numpy(), want, rtol=1e-5, atol=1e-6)


def ref_vb_bits(d, x0, xt, out, t):
    """Float64 numpy L_t in bits/dim (KL for t > 0, discretized NLL at t = 0 with improved-diffusion's tanh form
    of Φ, probabilities floored at 1e-12), no clipping."""
    mean, log_var, _ = ref_p_mean_variance(d, out, xt, t, clip=False)
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
    base = Diffusion(np.linspace(0.05, 0.4, 6), vb_scale=2.5)
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
    fixed = Diffusion(base.betas, learn_sigma=False).respace(3)
    plain = fixed.training_losses(lambda x, tt: out[:, :2], x0, t, noise=noise)
    np.testing.assert_allclose(plain["mse"].double().numpy(), mse, rtol=1e-5)
    assert plain["vb"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(plain["loss"], plain["mse"], rtol=0, atol=0)


def test_vb_terms_with_a_model_and_no_clipping_by_default():
    d = Diffusion(SMALL_BETAS)
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
    d = Diffusion(SMALL_BETAS, learn_sigma=False)
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
    d = Diffusion(SMALL_BETAS, learn_sigma=False)
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
    d = Diffusion(SMALL_BETAS, learn_sigma=False)
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
    d = Diffusion(SMALL_BETAS)
    x, t = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    model = lambda xx, tt: torch.cat([torch.full_like(xx, 0.1), torch.zeros_like(xx)], 1)
    grad = lambda xx, tt: torch.ones(xx.shape, dtype=torch.float64)
    assert d.p_sample(model, x, t, cond_fn=grad)["sample"].dtype == torch.float32
    assert d.ddim_sample(model, x, t, cond_fn=grad)["sample"].dtype == torch.float32


def test_float32_betas_are_promoted_and_a_two_step_chain_clips_with_posterior_variance_1():
    b32 = np.array([0.1, 0.2], dtype=np.float32)
    d = Diffusion(b32)
    b = b32.astype(np.float64)                       # the float32 values, then float64 arithmetic
    assert d.betas.dtype == d.alphas_cumprod.dtype == np.float64
    np.testing.assert_allclose(d.alphas_cumprod, [1 - b[0], (1 - b[0]) * (1 - b[1])], rtol=1e-15)
    post1 = b[1] * b[0] / (1 - (1 - b[0]) * (1 - b[1]))          # β̃_1 = β_1 (1 − ᾱ_0)/(1 − ᾱ_1), ᾱ_0 = 1 − β_0
    np.testing.assert_allclose(d.posterior_log_variance_clipped, np.log([post1, post1]), rtol=1e-14)


def test_learned_sigma_needs_twice_the_channels():
    d = Diffusion(SMALL_BETAS)
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
    d = Diffusion(SMALL_BETAS)
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
    d = Diffusion(SMALL_BETAS)
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
    d = Diffusion(SMALL_BETAS, learn_sigma=False)
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
    d = Diffusion(SMALL_BETAS, learn_sigma=False)
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
    losses = Diffusion(SMALL_BETAS, learn_sigma=False).training_losses(lambda xx, tt: torch.zeros_like(xx), x0, t)
    torch.manual_seed(12)
    noise = torch.randn(2, 1, 1, 1).double().flatten().numpy()
    np.testing.assert_allclose(losses["mse"].double().numpy(), noise ** 2, rtol=1e-6)


def test_loops_pass_guide_at_and_clip_denoised_on():
    """p_sample_loop(guide_at="mean") asks cond_fn at x_{t-1}'s index (0 at the last step); ddim_sample_loop with
    clip_denoised=False keeps x̂_0 = (x − sqrt(1−ᾱ) e)/sqrt(ᾱ) beyond ±1
    (η = 0: x_{t−1} = sqrt(ᾱ_{t−1}) x̂_0 + sqrt(1−ᾱ_{t−1}) e)."""
    d = Diffusion(SMALL_BETAS, learn_sigma=False)
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
