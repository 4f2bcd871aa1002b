"""One DDIM step against closed forms computed here in float64 from the schedule: the η > 0 noise scale
[DDIM eq. 12, 16] and classifier guidance in score form [ADM eq. 14]."""
import math

import numpy as np
import pytest
import torch

from ddpm import DiffusionConfig

EPS, V = 0.3, 0.2          # the fake network's constant ε̂ and variance output


@pytest.fixture(scope="module")
def chain():
    """A 10-step respacing of T = 1000: kept indices 0, 111, ..., 999."""
    return DiffusionConfig(diffusion_steps=1000).build().respace(10)


def fake_model(x, t):
    return torch.cat([torch.full_like(x, EPS), torch.full_like(x, V)], dim=1)


def alpha_bars(chain, t):
    """(ᾱ_t, ᾱ_{t-1}) per example, float64, from the cosine closed form at the kept original indices
    [IDDPM eq. 17]: ᾱ at original index k is f(k + 1) / f(0), f(u) = cos²((u/T + s)/(1 + s) · π/2)."""
    s, T = 0.008, 1000
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    kept = chain.timestep_map
    a = np.array([f(kept[i] + 1) / f(0) for i in t])
    a_prev = np.array([f(kept[i - 1] + 1) / f(0) if i > 0 else 1.0 for i in t])
    return a[:, None, None, None], a_prev[:, None, None, None]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_with_eta_matches_the_closed_form(chain, eta):
    """x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1 - ᾱ_{t-1} - σ²) ε̂ + σ z with
    σ = η sqrt((1-ᾱ_{t-1})/(1-ᾱ_t)) sqrt(1 - ᾱ_t/ᾱ_{t-1}) [DDIM eq. 12, 16]."""
    g = torch.Generator().manual_seed(0)
    t = [1, 4, 7]
    x = torch.randn(3, 3, 2, 2, generator=g)
    z = torch.randn(3, 3, 2, 2, generator=g)
    got = chain.ddim_sample(fake_model, x, torch.tensor(t), eta=eta, clip_denoised=False, noise=z)["sample"]
    a, a_prev = alpha_bars(chain, t)
    xd, zd = x.double().numpy(), z.double().numpy()
    x0 = (xd - np.sqrt(1 - a) * EPS) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma ** 2) * EPS + sigma * zd
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    if eta == 1.0:   # η = 1 is ancestral sampling: σ² = β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t) · β_t [DDIM sec. 4.1]
        beta = 1 - a / a_prev
        np.testing.assert_allclose(sigma ** 2, (1 - a_prev) / (1 - a) * beta, rtol=1e-12)


def test_ddim_noise_scale_at_eta_one_is_the_posterior_std(chain):
    """With x_t = 0 and ε̂ = 0 the step's mean is 0, so the sample is σ z: at η = 1, σ = sqrt(β̃_t)."""
    t = torch.tensor([2, 5, 8])
    x, z = torch.zeros(3, 1, 1, 1), torch.ones(3, 1, 1, 1)
    zero = lambda xx, tt: torch.zeros(xx.shape[0], 2, 1, 1)
    got = chain.ddim_sample(zero, x, t, eta=1.0, clip_denoised=False, noise=z)["sample"].flatten().double()
    a, a_prev = (v.flatten() for v in alpha_bars(chain, t.tolist()))
    torch.testing.assert_close(got, torch.from_numpy(np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))),
                               rtol=1e-5, atol=0)


def test_guidance_in_score_form_subtracts_sqrt_one_minus_alpha_bar_times_the_gradient(chain):
    """ε' = ε̂ - sqrt(1-ᾱ_t) g, x̂_0' = (x_t - sqrt(1-ᾱ_t) ε')/sqrt(ᾱ_t) [ADM eq. 14]; with η = 0 the step is
    sqrt(ᾱ_{t-1}) x̂_0' + sqrt(1-ᾱ_{t-1}) ε'. The gradient is a constant 0.7, asked at the original timesteps."""
    g = torch.Generator().manual_seed(1)
    t = [2, 6]
    x = torch.randn(2, 3, 2, 2, generator=g)
    seen = []

    def cond_fn(xx, tt):
        seen.append(tt.tolist())
        return torch.full_like(xx, 0.7)

    a, a_prev = alpha_bars(chain, t)
    eps = EPS - np.sqrt(1 - a) * 0.7
    x0 = (x.double().numpy() - np.sqrt(1 - a) * eps) / np.sqrt(a)
    out = chain.p_mean_variance(fake_model, x, torch.tensor(t), clip_denoised=False)
    np.testing.assert_allclose(chain.condition_score(cond_fn, out, x, torch.tensor(t)).double().numpy(), x0,
                               rtol=1e-5, atol=1e-5)
    step = chain.ddim_sample(fake_model, x, torch.tensor(t), cond_fn=cond_fn, clip_denoised=False)
    np.testing.assert_allclose(step["pred_x0"].double().numpy(), x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step["sample"].double().numpy(), np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps,
                               rtol=1e-5, atol=1e-5)
    assert seen == [[222, 666]] * 2
