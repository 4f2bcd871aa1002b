"""beyond/target.py and beyond/target_guidance.py (target guidance, Langevin corrector, SMC): sampling at a chosen level between the extremes.

The sampler is checked on a 1-D two-component Gaussian mixture, where the noised density p_t, its score and the
exact noisy classifier p_t(y | x) are closed forms: Langevin steps must sample the tilted product
p_t(x)·p_t(1 | x)^{λq}·p_t(0 | x)^{λ(1−q)} (normalised on a grid as the oracle), and the annealed guided sampler with
λ = 1 and q = (0, 1) must return the class-1 component itself. Sequential Monte Carlo resampling on a potential G must
sample the sampler's own law times G(x_0), both without guidance (the mixture times G) and with it (the class-1
component times G).
"""
import argparse
import json

import numpy as np
import pytest
import torch

from beyond import target
from data import circles_dataset, render_circles
from ddpm import GaussianDiffusion, cosine_betas
from guidance import multi_guidance
from beyond.target_guidance import (langevin_step, p_sample_loop, shift_averaged, smc_resample, target_guidance,
                                    target_potential)
from test_cli import run, tiny_run  # noqa: F401  (module fixture: a 16x16 run with a classifier)
from test_guidance import small_classifier

MU, S, W = torch.tensor([-0.5, 0.5]), 0.15, torch.tensor([0.5, 0.5])   # the mixture: means, std, weights


class Mixture:
    """The 1-D mixture Σ_k w_k N(μ_k, S²) under `diffusion`: exact ε-network and exact noisy classifier."""

    def __init__(self, diffusion):
        self.abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float64)

    def log_joint(self, x, t):
        """log w_k N(x; sqrt(ᾱ_t) μ_k, ᾱ_t S² + 1 − ᾱ_t), [N, 2], for x [N, 1, 1, 1]."""
        a = self.abar[t].view(-1, 1).to(x.dtype)
        var = a * S ** 2 + 1 - a
        x = x.view(-1, 1)
        return torch.log(W) - 0.5 * (x - a.sqrt() * MU) ** 2 / var - 0.5 * torch.log(2 * np.pi * var)

    def classifier(self, x, t):
        return self.log_joint(x, t)                           # logits: log_softmax gives p_t(y | x) exactly

    def eps(self, x, t, **kwargs):
        with torch.enable_grad():
            xx = x.detach().double().requires_grad_(True)
            score = torch.autograd.grad(torch.logsumexp(self.log_joint(xx, t), -1).sum(), xx)[0]
        return (-(1 - self.abar[t]).sqrt().view(-1, 1, 1, 1) * score).float()   # ε = -sqrt(1-ᾱ) ∇ log p_t


def ks_to_density(samples, grid, density):
    """Kolmogorov–Smirnov distance between samples and a density tabulated on a uniform grid."""
    cdf = np.cumsum(density)
    cdf /= cdf[-1]
    s = np.sort(samples)
    return float(np.abs(np.searchsorted(s, grid, side="right") / len(s) - cdf).max())


# ----- the guidance -----

def test_kl_target_guidance_is_multi_guidance_with_asymmetric_weights():
    c = small_classifier(2, 3)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 700, 3999])
    for q in (0.5, 0.3, 0.9):
        torch.testing.assert_close(target_guidance(c, [1 - q, q], 60.0)(x, t),
                                   multi_guidance([c], [[60 * (1 - q), 60 * q]])(x, t), rtol=1e-4, atol=1e-6)


def test_two_class_target_gradients_by_hand():
    """kl: λ(q − p)∇f; mse: −λ(p − q)·p(1 − p)·∇f·2 (both classes' squared errors); logit: −λ(f − log(q/(1 − q)))∇f;
    f = logit_1 − logit_0."""
    c = small_classifier(2, 4)
    x, t, q, lam = torch.randn(2, 3, 16, 16), torch.tensor([10, 2000]), 0.3, 5.0
    xx = x.clone().requires_grad_(True)
    logits = c(xx, t)
    f = logits[:, 1] - logits[:, 0]
    grad_f = torch.autograd.grad(f.sum(), xx)[0]
    p = torch.sigmoid(f).detach().view(-1, 1, 1, 1)
    torch.testing.assert_close(target_guidance(c, [1 - q, q], lam)(x, t), lam * (q - p) * grad_f, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(target_guidance(c, [1 - q, q], lam, loss="mse")(x, t),
                               -2 * lam * (p - q) * p * (1 - p) * grad_f, rtol=1e-4, atol=1e-6)
    f_target = float(np.log(q / (1 - q)))
    torch.testing.assert_close(target_guidance(c, [1 - q, q], lam, loss="logit")(x, t),
                               -lam * (f.detach().view(-1, 1, 1, 1) - f_target) * grad_f, rtol=1e-4, atol=1e-5)


def test_target_may_change_with_the_timestep():
    c = small_classifier(2, 5)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 2000])
    per_t = target_guidance(c, lambda t: torch.stack([1 - t / 4000, t / 4000], 1), 2.0)(x, t)
    for i in range(2):
        q = float(t[i]) / 4000
        torch.testing.assert_close(per_t[i:i + 1], target_guidance(c, [1 - q, q], 2.0)(x[i:i + 1], t[i:i + 1]))
    with pytest.raises(ValueError, match="unknown target loss"):
        target_guidance(c, [0.5, 0.5], 1.0, loss="l1")


def test_shift_average_equals_rolled_copies_away_from_the_border():
    """One bright pixel on a constant background: replicate padding equals torch.roll, the oracle."""
    torch.manual_seed(0)
    weights = torch.randn(2, 12, 12)
    clf = lambda x, t: torch.einsum("nchw,khw->nk", x, weights) + t.view(-1, 1).float() / 100
    x = -torch.ones(3, 1, 12, 12)
    for i, (r, c) in enumerate(((5, 5), (3, 8), (7, 2))):
        x[i, 0, r, c] = 1.0
    t = torch.tensor([0, 50, 100])
    for shifts in (2, 4, 5):
        offsets = [d - shifts // 2 for d in range(shifts)]
        probs = torch.stack([torch.softmax(clf(torch.roll(x, (d, d), (-2, -1)), t), -1) for d in offsets])
        torch.testing.assert_close(shift_averaged(clf, shifts)(x, t), torch.log(probs.mean(0)))
    assert shift_averaged(clf, 1) is clf


def test_shift_average_flattens_a_lattice_saw_tooth():
    """p(class 1) = σ(trend + saw-tooth of period 4) along x: averaged over 4 shifts it rises monotonically."""
    xs = torch.arange(4, 28)
    logit = lambda col: 0.3 * (col - 16).float() + 2.0 * torch.tensor([1.0, -1.0, 1.5, -1.5])[col % 4]
    clf = lambda x, t: torch.stack([torch.zeros(len(x)), logit(x[:, 0, 0].argmax(-1))], 1)
    x = -torch.ones(len(xs), 1, 1, 32)
    x[torch.arange(len(xs)), 0, 0, xs] = 1.0
    t = torch.zeros(len(xs), dtype=torch.long)
    raw = torch.softmax(clf(x, t), -1)[:, 1]
    smooth = shift_averaged(clf, 4)(x, t).exp()[:, 1]
    assert (raw.diff() < 0).any() and (smooth.diff() > 0).all()


# ----- the sampler on a closed-form mixture -----

def test_langevin_steps_sample_the_tilted_product():
    diffusion = GaussianDiffusion(np.full(10, 0.05), learn_sigma=False)
    toy, level, lam, q = Mixture(diffusion), 3, 6.0, 0.3
    cond_fn = target_guidance(toy.classifier, [1 - q, q], lam)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, 1, 1, generator=gen)
    t = torch.full((len(x),), level)
    for _ in range(2000):                          # ε = 0.1·β = 0.005 per step: total Langevin time 10
        x = langevin_step(diffusion, toy.eps, x, t, cond_fn, step_scale=0.1, noise=torch.randn(x.shape, generator=gen))
    grid = torch.linspace(-2.5, 2.5, 5001, dtype=torch.float64)
    log_joint = toy.log_joint(grid.view(-1, 1, 1, 1), torch.full((len(grid),), level))
    log_post = torch.log_softmax(log_joint, -1)
    log_density = torch.logsumexp(log_joint, -1) + lam * ((1 - q) * log_post[:, 0] + q * log_post[:, 1])
    density = torch.exp(log_density - log_density.max()).numpy()
    assert ks_to_density(x.flatten().numpy(), grid.numpy(), density) < 0.02
    untilted = torch.exp(torch.logsumexp(log_joint, -1)).numpy()
    assert ks_to_density(x.flatten().numpy(), grid.numpy(), untilted) > 0.1      # the tilt is visible


@pytest.mark.parametrize("corrector", [None, (2, 0.1, 0)])
def test_guided_sampler_with_the_exact_classifier_returns_the_class_component(corrector):
    """λ = 1, q = (0, 1): ∇ log p_t(x) + ∇ log p_t(1 | x) = ∇ log p_t(x | 1), so the samples are N(μ_1, S²)."""
    diffusion = GaussianDiffusion(cosine_betas(400), learn_sigma=False, sigma_small=True)
    toy = Mixture(diffusion)
    x = p_sample_loop(diffusion, toy.eps, (8000, 1, 1, 1), cond_fn=target_guidance(toy.classifier, [0.0, 1.0], 1.0),
                      clip_denoised=False, generator=torch.Generator().manual_seed(1), corrector=corrector)
    x = x.flatten()
    assert abs(float(x.mean()) - 0.5) < 0.01 and abs(float(x.std()) - S) < 0.01
    assert float((x < 0).float().mean()) < 0.002


@pytest.mark.parametrize("guided,every", [(False, 1), (True, 1), (True, 7)])
def test_smc_resampling_samples_the_law_times_the_potential(guided, every):
    """Unguided: p_0(x)·G(x, 0); guided to class 1 (λ = 1, q = (0, 1)): N(μ_1, S²)·G(x, 0). G = exp(−κ/2 (f − f*)²),
    f the exact logit, f* = log(q/(1 − q)): both closed forms on a grid, compared with the particles' histogram."""
    diffusion = GaussianDiffusion(cosine_betas(400), learn_sigma=False, sigma_small=True)
    toy, kappa, q = Mixture(diffusion), 0.02, (0.7 if guided else 0.3)
    cond_fn = target_guidance(toy.classifier, [0.0, 1.0], 1.0) if guided else None
    potential = target_potential(toy.classifier, [1 - q, q], kappa)
    x = p_sample_loop(diffusion, toy.eps, (20000, 1, 1, 1), cond_fn=cond_fn, clip_denoised=False,
                      resample=(potential, every), generator=torch.Generator().manual_seed(2))
    x = x.flatten().numpy()
    grid = torch.linspace(-1.5, 1.5, 3001, dtype=torch.float64)
    log_joint = toy.log_joint(grid.view(-1, 1, 1, 1), torch.zeros(len(grid), dtype=torch.long))
    f = log_joint[:, 1] - log_joint[:, 0]
    log_law = log_joint[:, 1] if guided else torch.logsumexp(log_joint, -1)      # class 1 alone: N(μ_1, S²)
    log_density = log_law - 0.5 * kappa * (f - np.log(q / (1 - q))) ** 2
    density = torch.exp(log_density - log_density.max()).numpy()
    assert ks_to_density(x, grid.numpy(), density) < 0.045     # resampling leaves ~1/3 of N effective: KS noise ~0.02
    assert ks_to_density(x, grid.numpy(), torch.exp(log_law - log_law.max()).numpy()) > 0.3    # G is visible


def test_smc_potential_sees_the_original_timestep_of_the_level_reached_and_the_seed_fixes_the_draws():
    """On a respaced chain the potential is called after every `every`-th step i with timestep_map[max(i − 1, 0)];
    the resampling draws from the sampler's generator, so a seed gives the same samples twice."""
    base = GaussianDiffusion(cosine_betas(100), learn_sigma=False, sigma_small=True)
    diffusion, toy, seen = base.respace(10), Mixture(base), []                # the networks see original timesteps

    def potential(x, t):
        seen.append(int(t[0]))
        return -0.5 * x.flatten() ** 2 / 0.01                   # strong: every call leaves ESS < N/2

    def draw(seed):
        return p_sample_loop(diffusion, toy.eps, (500, 1, 1, 1), clip_denoised=False, resample=(potential, 3),
                             generator=torch.Generator().manual_seed(seed))

    first = draw(0)
    assert seen == [int(diffusion.timestep_map[max(i - 1, 0)]) for i in (9, 6, 3, 0)]
    assert torch.equal(first, draw(0)) and not torch.equal(first, draw(1))


def test_without_corrector_or_resampling_the_loop_draws_the_paper_samplers_samples():
    """beyond/target_guidance.p_sample_loop wraps ddpm's: with neither addition, the same noise in the same order."""
    diffusion = GaussianDiffusion(cosine_betas(50), learn_sigma=False, sigma_small=True).respace(7)
    toy = Mixture(GaussianDiffusion(cosine_betas(50), learn_sigma=False, sigma_small=True))
    cond_fn = target_guidance(toy.classifier, [0.4, 0.6], 3.0)
    args = (toy.eps, (64, 1, 1, 1))
    ours = p_sample_loop(diffusion, *args, cond_fn=cond_fn, generator=torch.Generator().manual_seed(3))
    paper = diffusion.p_sample_loop(*args, cond_fn=cond_fn, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, paper)


def test_smc_resample_draws_by_weight_and_leaves_equal_weights_alone():
    x, log_g = torch.arange(4.0), torch.tensor([0.0, -1.0, -2.0, -3.0])
    same = smc_resample(x, log_g, torch.zeros(4))
    assert same[0] is x and same[1] is log_g
    got, got_g, log_w = smc_resample(x, log_g, torch.tensor([0.0, -np.inf, -np.inf, -np.inf]))
    assert (got == 0).all() and (got_g == 0).all() and (log_w == 0).all()
    x = torch.arange(40000) % 4
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    got = smc_resample(x, x.float(), torch.log(weights[x]))[0]     # P(value k) ∝ 10000·weight_k
    share = torch.bincount(got, minlength=4).double() / len(got)
    assert torch.allclose(share, weights.double(), atol=0.015)


def test_target_potential_is_minus_half_scale_logit_gap_squared():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    potential = target_potential(lambda x, t: logits, [0.2, 0.8], 3.0)(torch.zeros(2, 1), torch.zeros(2))
    f, f_star = torch.tensor([1.0, -3.0]), np.log(4.0)
    assert torch.allclose(potential, -1.5 * (f - f_star) ** 2)


def test_logit_loss_and_potential_at_a_target_of_exactly_0_or_1_are_finite():
    """q = (0, 1): f* = log(q_1/q_0) is floored to ±log(1/tiny) = ±87.34 (float32) instead of ±inf, which made the
    logit guidance NaN and the potential −inf. Classifier logits (0, a·x): f = a·x, g = scale·(f* − f)·a."""
    a, scale = 2.0, 3.0
    x, t = torch.tensor([[0.5], [-1.0]]), torch.zeros(2, dtype=torch.long)
    clf = lambda x, t: torch.cat([torch.zeros_like(x), a * x], 1)
    edge = -np.log(torch.finfo(torch.float32).tiny)                     # 87.3365...
    for q, f_star in (([0.0, 1.0], edge), ([1.0, 0.0], -edge)):
        f = a * x[:, 0]
        torch.testing.assert_close(target_guidance(clf, q, scale, loss="logit")(x, t)[:, 0],
                                   scale * (f_star - f) * a, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(target_potential(clf, q, scale)(x, t), -0.5 * scale * (f - f_star) ** 2,
                                   rtol=1e-5, atol=1e-3)


# ----- levels and maps -----

def test_levels_of_circles_and_broken_images():
    images = render_circles([np.array([[4, 8]]), np.array([[11, 3]]), np.zeros((0, 2)), np.array([[3, 3], [12, 12]])],
                            16, radius=2)
    levels = target.measure_levels(images, dict(name="circles"))
    np.testing.assert_allclose(levels[:2], [4 / 16, 11 / 16], atol=1e-9)
    assert np.isnan(levels[2:]).all()
    assert target.measure_levels(images, dict(name="celeba")) is None


def test_distinct_centres_per_batch_by_hand():
    """Batch 1: two discs at (5, 5) and one at (10, 3): 2 distinct of 3; batch 2: (9, 9) and an empty image: 1 of 1."""
    centres = [[[5, 5]], [[5, 5]], [[10, 3]], [[9, 9]], np.zeros((0, 2))]
    images = render_circles([np.array(c, dtype=float).reshape(-1, 2) for c in centres], 16, radius=2)
    assert target.distinct_centres(images, 3) == pytest.approx((2 / 3 + 1) / 2)
    assert target.distinct_centres(images, 5) == pytest.approx(3 / 4)
    assert np.isnan(target.distinct_centres(images[4:], 3))


def test_extreme_levels_are_the_mean_training_positions():
    d = dict(name="circles", image_size=32, radius=2, delta=0.2, seed=42)
    _, labels, pos = circles_dataset(32, 2, 0.2, seed=42)
    m0, m1 = target.extreme_levels(d)
    assert m0 == pytest.approx(pos[labels == 0, 0].mean() / 32) and m1 == pytest.approx(pos[labels == 1, 0].mean() / 32)
    assert (m0, m1) == pytest.approx((3.5 / 32, 27.5 / 32))      # x in 2..5 and 26..29 (border 6, radius 2)
    assert target.relative_position((m0 + m1) / 2, (m0, m1)) == pytest.approx(0.5)
    assert target.relative_position(0.7, None) == 0.7


def test_linear_map_clips_away_from_zero_and_one():
    torch.testing.assert_close(target.linear_q(0.25), torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(target.linear_q(-3.0), torch.tensor([0.99, 0.01]))
    torch.testing.assert_close(target.linear_q(1.5), torch.tensor([0.01, 0.99]))


def test_logit_map_interpolates_the_extremes_logits():
    """Class-0 images black, class-1 white, a classifier with logit 4·mean(x): f̄_0 ≈ −4, f̄_1 ≈ 4 at t = 0."""
    diffusion = GaussianDiffusion(np.full(10, 1e-6))
    images = np.concatenate([np.zeros((5, 4, 4, 3), np.uint8), np.full((5, 4, 4, 3), 255, np.uint8)])
    labels = np.array([0] * 5 + [1] * 5)
    clf = lambda x, t: torch.stack([torch.zeros(len(x)), 4 * x.mean((1, 2, 3))], 1)
    for r, q1 in ((0.5, 0.5), (0.25, 1 / (1 + np.exp(2))), (1.0, 1 / (1 + np.exp(-4)))):
        q = target.logit_q(clf, diffusion, images, labels, r, "cpu")(torch.tensor([0, 0]))
        np.testing.assert_allclose(q.numpy(), [[1 - q1, q1]] * 2, atol=2e-3)


def test_level_stats_by_hand():
    s = target.level_stats([0.1, 0.2, np.nan, 0.3, 0.4, 0.5], target=0.25)
    assert s["level_median"] == pytest.approx(0.3) and s["level_q25"] == pytest.approx(0.2)
    assert s["level_iqr"] == pytest.approx(0.2) and s["level_error"] == pytest.approx(0.05)
    assert s["broken"] == pytest.approx(1 / 6)


# ----- sample.py --target -----

def test_sample_at_a_target_writes_the_level_report(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--target", "0.4", "--corrector-steps", "1", "--smc-scale", "5",
        "--num-samples", "4", "--sample-steps", "5")
    out = tiny_run / "samples" / "classifier_target0.4_linear_logit150_shift4_pc1x0.5_smc5_steps5_n4_seed0"  # defaults
    report = json.loads((out / "report.json").read_text())
    m0, m1 = report["extremes"]
    assert report["relative_position"] == pytest.approx((0.4 - m0) / (m1 - m0))
    assert report["q"] == pytest.approx(report["relative_position"]) and report["smc_scale"] == 5
    for key in ("level_median", "level_iqr", "broken", "accuracy_middle", "distinct_centres"):
        assert key in report, key
    assert (out / "histogram_level.png").exists() and (out / "grid.png").exists()


@pytest.mark.parametrize("args,message", [
    (["--target", "0.4", "--lambdas", "30,30"], "drop --lambdas"),
    (["--corrector-steps", "2"], "add --target"),
    (["--target", "0.4", "--target-scale", "0"], "--target-scale and --corrector-size positive"),
    (["--target", "nan"], "argument --target: nan is not a finite float32 number"),
    (["--target", "0.4", "--smc-scale", "-1"], "--smc-scale in [0, 1e+06]"),
    (["--target", "0.4", "--smc-scale", "1e7"], "--smc-scale in [0, 1e+06]"),
    (["--target", "0.4", "--smc-scale", "3", "--batch-size", "1"], "use --batch-size 2 or more"),
    (["--smc-scale", "3"], "--smc-scale shapes --target sampling: add --target"),
    (["--target", "0.4", "--ddim"], "drop --cfg-scale, --ddim"),
])
def test_target_bad_input_is_one_line_exit_2(tiny_run, args, message):  # noqa: F811
    proc = run("sample.py", "--run", tiny_run, "--num-samples", "2", *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_target_flags_without_a_target_are_refused_and_defaults_fill_in():
    args = argparse.Namespace(target=None, **dict(dict.fromkeys(target.DEFAULTS), target_map="logit"))
    with pytest.raises(Exception, match="--target-map shapes --target sampling: add --target"):
        target.check_flags(args, [])
    args = argparse.Namespace(target=0.4, lambdas=None, cfg_scale=None, ddim=False, interpolate=False, edit=False,
                              guide_at="x_t", **dict(dict.fromkeys(target.DEFAULTS), target_scale=7.0))
    target.check_flags(args, [2])
    assert args.target_loss == target.DEFAULTS["target_loss"] and args.target_scale == 7.0


def test_sweep_summary_by_hand_and_a_zero_baseline_clock():
    from scripts import target_sweep
    rows = [dict(method="m", classifier="c", target=t, level_error=e, level_iqr=q, broken=b, seconds_per_sample=s)
            for t, e, q, b, s in [(0.3, 0.01, 0.05, 0.0, 2.0), (0.7, 0.02, 0.07, 0.1, 4.0)]]
    s = target_sweep.summary(rows, {"c": 1.0})["m"]
    assert (s["worst_error"], s["worst_iqr"], s["worst_broken"]) == (0.02, 0.07, 0.1)
    assert s["mean_error"] == pytest.approx(0.015) and s["broken"] == pytest.approx(0.05) and s["cost"] == 3.0
    assert not target_sweep.meets_goal(s) and target_sweep.meets_goal(dict(s, worst_broken=0.05))
    s = target_sweep.summary(rows, {"c": 0.0})["m"]       # a clock that read 0 s: the cost is unknown, not a crash
    assert np.isnan(s["cost"]) and not target_sweep.meets_goal(dict(s, worst_broken=0.0))


def test_target_sweep_tables_match_the_sample_reports(tiny_run):  # noqa: F811
    run("scripts/target_sweep.py", "--run", tiny_run, "--targets", "0.3,0.6", "--num-samples", "2", "--name", "t",
        "--method", "kl=--target-loss kl --target-scale 60 --target-shifts 1", "--sample-args", "--sample-steps 2")
    folder = tiny_run / "target_sweeps" / "t"
    result = json.loads((folder / "target_sweep.json").read_text())
    assert [(r["method"], r["target"]) for r in result["rows"]] == [("kl", 0.3), ("kl", 0.6)]
    for r in result["rows"]:
        report = json.loads((tiny_run / "samples" / f"target_t_kl_classifier_{r['target']:g}" / "report.json").read_text())
        assert r["level_median"] == report["level_median"] or np.isnan(report["level_median"])
        assert r["broken"] == report["broken"]
        assert r["distinct"] == report["distinct_centres"] or np.isnan(report["distinct_centres"])
    base = json.loads((tiny_run / "samples" / "target_t_baseline_classifier" / "report.json").read_text())
    cost = np.mean([r["seconds_per_sample"] for r in result["rows"]]) / (base["seconds"] / base["num_samples"])
    assert result["methods"]["kl"]["cost"] == pytest.approx(cost)
    assert result["methods"]["kl"]["worst_broken"] == max(r["broken"] for r in result["rows"])
    for name in ("achieved.png", "grid_targets.png", "profiles.png", "target_sweep.md"):
        assert (folder / name).exists(), name
    run("scripts/target_sweep.py", "--run", tiny_run, "--profiles-only", "--name", "p")
    profiles = json.loads((tiny_run / "target_sweeps" / "p" / "profiles.json").read_text())
    assert len(profiles["classifier_t0_shifts4"]) == len(profiles["coords"]) == 12     # x = 2..13 of 16 px


@pytest.mark.parametrize("args,message", [
    (["--method", "a b=--target-scale 3"], "--method takes NAME=FLAGS"),
    (["--targets", "0.3,x"], "--targets takes comma-separated numbers"),
    (["--classifier", "nope"], "--classifier 'nope': not in"),
    (["--method", "m=--target-scale"], "expected one argument"),
])
def test_target_sweep_bad_input(tiny_run, args, message):  # noqa: F811
    proc = run("scripts/target_sweep.py", "--run", tiny_run, *args, ok=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
