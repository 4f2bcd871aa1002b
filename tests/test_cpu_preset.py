"""beyond/cpu_preset.py: the three additions of the CPU preset, each against a closed form or a hand-computed case,
and the paper preset's code path, which must contain none of them."""
import math

import numpy as np
import pytest
import torch

from beyond import cpu_preset
from infra.checkpoint import build_classifier
from classifier import ClassifierConfig
from cli import InputError
from beyond.cpu_preset import MirrorEquivariant, channel_mean_stats, dc_corrected, guidance_window
from data import circles_dataset
from ddpm import DiffusionConfig, GaussianDiffusion
from guidance import multi_guidance
from test_guidance import Counting, small_classifier

SMALL = dict(image_size=16, model_channels=16, num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2, 2),
             num_head_channels=16)
SMALL_BETAS = np.array([0.1, 0.2, 0.3])


@pytest.fixture(scope="module")
def diffusion():
    return DiffusionConfig(diffusion_steps=4000).build()


def corrected_eps(diffusion, mean, var, x_t, t, eps):
    """ε̂ after cpu_preset.dc_corrected, for a network whose ε̂ is `eps` (t: original timesteps)."""
    return dc_corrected(lambda x, t_: eps, diffusion, mean, var)(x_t, t)


# ----- DC correction -----

def test_dc_correction_recovers_the_noise_mean_when_every_image_has_the_same_mean(diffusion):
    """Circles: every image's channel means are equal, so DC(ε) is a function of DC(x_t): a network that gets
    everything but the DC right is made exact."""
    images, _, _ = circles_dataset(16)
    prior = channel_mean_stats(images)
    assert max(prior["var"]) < 1e-20
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(127.5).sub(1).float()
    for step in (0, 10, 1000, 2000, 3500, 3999):
        t = torch.full((len(x0),), step)
        eps = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, eps)
        blind = eps - eps.mean(dim=(2, 3), keepdim=True)          # right except for the DC
        fixed = corrected_eps(diffusion, prior["mean"], prior["var"], x_t, t, blind)
        torch.testing.assert_close(fixed.mean(dim=(2, 3)), eps.mean(dim=(2, 3)), atol=2e-3, rtol=0)
        torch.testing.assert_close(fixed - fixed.mean(dim=(2, 3), keepdim=True), blind, atol=1e-6, rtol=0)
        x0_hat = diffusion.predict_x0_from_eps(x_t, t, fixed)   # float32 error × 1/sqrt(ᾱ) ≈ 1e5 at t = T-1
        torch.testing.assert_close(x0_hat.mean(dim=(2, 3)), x0.mean(dim=(2, 3)), atol=2e-3 if step < 3999 else 2e-2,
                                   rtol=0)


def test_dc_correction_is_the_least_squares_estimate_for_gaussian_image_means(diffusion):
    """u_0 ~ N(m, s²): the corrected DC is the regression of DC(ε) on DC(x_t), estimated here by Monte Carlo."""
    g = torch.Generator().manual_seed(0)
    n_img, side, m, s2 = 20000, 8, torch.tensor([-0.3, 0.1, 0.5]), torch.tensor([0.04, 0.01, 0.0025])
    for step in (50, 400, 2000):
        u0 = m + s2.sqrt() * torch.randn(n_img, 3, generator=g)
        x0 = u0[:, :, None, None].expand(n_img, 3, side, side)
        eps = torch.randn(n_img, 3, side, side, generator=g)
        t = torch.full((n_img,), step)
        x_t = diffusion.q_sample(x0, t, eps)
        fixed = corrected_eps(diffusion, m.numpy(), s2.numpy(), x_t, t, torch.zeros_like(eps)).mean(dim=(2, 3))
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


def test_dc_correction_of_a_respaced_chain_uses_the_original_timesteps_and_keeps_the_rest(diffusion):
    """The wrapper sees original timesteps: on a respaced chain its ᾱ is that of the kept step, so it equals the
    correction computed on the full chain at the same original t; only the channel means of ε̂ change, v passes."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    out = torch.randn(2, 6, 8, 8)
    chain = diffusion.respace(10)
    t = torch.from_numpy(chain.timestep_map[[2, 7]])
    net = dc_corrected(lambda x_t, t_: out, chain, [0.0] * 3, [0.1] * 3)
    full = dc_corrected(lambda x_t, t_: out, diffusion, [0.0] * 3, [0.1] * 3)
    fixed = net(x, t)
    torch.testing.assert_close(fixed, full(x, t), rtol=0, atol=0)
    assert not torch.allclose(fixed[:, :3], out[:, :3]) and torch.equal(fixed[:, 3:], out[:, 3:])
    torch.testing.assert_close(fixed[:, :3] - fixed[:, :3].mean(dim=(2, 3), keepdim=True),
                               out[:, :3] - out[:, :3].mean(dim=(2, 3), keepdim=True))
    plain = chain.p_mean_variance(lambda x_t, t_: out, x, torch.tensor([2, 7]))
    assert torch.equal(plain["eps"], out[:, :3])                       # the paper's chain has no correction


def test_dc_corrected_eps_by_hand():
    """ε̂ − DC(ε̂) + g (u − sqrt(ᾱ) m), g = sqrt(1−ᾱ)/n / (ᾱ s² + (1−ᾱ)/n), per image and channel; n = H·W."""
    d = GaussianDiffusion(SMALL_BETAS)
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 2, 2, 3, generator=g), torch.randn(2, 2, 2, 3, generator=g)
    t = torch.tensor([1, 2])
    got = corrected_eps(d, [0.2, -0.1], [0.05, 0.0], x, t, eps).double().numpy()
    a = np.array([0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7])      # ᾱ of β = 0.1, 0.2, 0.3 by hand
    xn, en = x.double().numpy(), eps.double().numpy()
    want = np.empty_like(en)
    for i, ti in enumerate([1, 2]):
        for c, (m, s2) in enumerate([(0.2, 0.05), (-0.1, 0.0)]):
            n, ab = 6, a[ti]
            gain = math.sqrt(1 - ab) / n / (ab * s2 + (1 - ab) / n)
            want[i, c] = en[i, c] - en[i, c].mean() + gain * (xn[i, c].mean() - math.sqrt(ab) * m)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    net = dc_corrected(lambda xx, tt: torch.cat([eps, torch.zeros_like(eps)], 1), d, [0.2, -0.1], [0.05, 0.0])
    out = d.p_mean_variance(net, x, t, clip_denoised=False)
    np.testing.assert_allclose(out["eps"].double().numpy(), want, rtol=1e-5, atol=1e-6)



# ----- mirror-equivariant head -----

def test_mirror_equivariant_head_swaps_the_classes_of_a_flipped_image():
    torch.manual_seed(0)
    model = MirrorEquivariant(ClassifierConfig(**SMALL).build()).eval()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 10, 2000, 3999])
    with torch.no_grad():
        logits, flipped = model(x, t), model(x.flip(-1), t)
        symmetric = model(x + x.flip(-1), t).softmax(-1)
    torch.testing.assert_close(flipped, logits.flip(-1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits[:, 0], logits[:, 1])
    torch.testing.assert_close(symmetric, torch.full_like(symmetric, 0.5))
    plain = ClassifierConfig(**SMALL).build().eval()
    with torch.no_grad():
        assert not torch.allclose(plain(x.flip(-1), t), plain(x, t).flip(-1), atol=1e-4)
    with pytest.raises(InputError, match="swaps 2 classes"):
        build_classifier(dict(classifier=dict(SMALL, num_classes=4, mirror_equivariant=True)))


# ----- guidance window -----

def test_guidance_window_keeps_the_gradient_at_and_above_t_min_only():
    c = small_classifier(2, 5)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 499, 500, 3999])
    full = multi_guidance([c], [[30.0, 30.0]])
    g = guidance_window(full, 500)(x, t)
    torch.testing.assert_close(g[2:], full(x, t)[2:])
    assert torch.equal(g[:2], torch.zeros_like(g[:2]))
    assert guidance_window(full, 0) is full and guidance_window(None, 500) is None

def test_guidance_window_skips_the_classifier_below_t_min():
    clf = Counting(small_classifier(2, 6))
    d = DiffusionConfig(diffusion_steps=1000).build().respace(10)
    model = lambda x, t: torch.zeros(x.shape[0], 6, *x.shape[2:])
    d.p_sample_loop(model, (2, 3, 16, 16), cond_fn=guidance_window(multi_guidance([clf], [[30.0, 30.0]]), 500))
    guided = int((d.timestep_map >= 500).sum())
    assert 0 < guided < 10 and clf.forwards == guided and clf.backwards == guided

def test_guidance_window_by_hand_with_a_constant_gradient():
    """Rows with t >= t_min keep the gradient (t = t_min included), the others get 0; t_min = 1 already limits
    (only t_min <= 0 is the unlimited paper setting); a batch entirely below t_min never calls cond_fn."""
    calls = []

    def ones(x, t):
        calls.append(t.tolist())
        return torch.ones_like(x)

    x = torch.zeros(3, 1, 1, 2)
    got = guidance_window(ones, 1)(x, torch.tensor([0, 1, 7]))
    assert got[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0] and calls == [[0, 1, 7]]
    got = guidance_window(ones, 7)(x, torch.tensor([7, 6, 8]))
    assert got[:, 0, 0, 0].tolist() == [1.0, 0.0, 1.0]
    calls.clear()
    got = guidance_window(ones, 7)(x, torch.tensor([0, 6, 3]))
    assert calls == [] and got.dtype == torch.float32 and torch.equal(got, torch.zeros_like(x))
    assert guidance_window(ones, -1) is ones


def test_mirror_wrapper_adds_no_weights_and_checkpoints_hold_the_classifier_alone():
    torch.manual_seed(0)
    inner = ClassifierConfig(**SMALL).build()
    wrapped = MirrorEquivariant(inner)
    assert list(wrapped.state_dict()) == list(inner.state_dict())
    assert sum(p.numel() for p in wrapped.parameters()) == sum(p.numel() for p in inner.parameters())
    config = dict(classifier=dict(SMALL, mirror_equivariant=True))
    rebuilt = build_classifier(config)
    assert type(rebuilt) is MirrorEquivariant and type(build_classifier(
        dict(classifier=dict(SMALL, mirror_equivariant=False)))) is type(inner)
    rebuilt.load_state_dict(wrapped.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2000])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, t), wrapped.eval()(x, t))
        assert torch.equal(rebuilt.features(x, t), inner.features(x, t))


# ----- the paper preset touches none of the three additions -----

def poison(monkeypatch, calls=None):
    """Make every entry into the three additions fail (calls is None) or be recorded in `calls`."""
    from infra import checkpoint

    def spy(name, real):
        def wrapped(*args, **kwargs):
            if calls is None:
                raise AssertionError(f"the paper preset used cpu_preset.{name}")
            calls.add(name)
            return real(*args, **kwargs)
        return wrapped

    for name in ("dc_corrected", "MirrorEquivariant", "guidance_window"):      # where cpu_preset.Additions calls them
        monkeypatch.setattr(cpu_preset, name, spy(name, getattr(cpu_preset, name)))
    monkeypatch.setattr(checkpoint, "MirrorEquivariant", cpu_preset.MirrorEquivariant)   # training's head (spied)


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_the_paper_preset_path_contains_none_of_the_additions(preset, tmp_path, monkeypatch):
    """Train a tiny run of each preset and sample it with guidance: with `--preset paper` no addition is entered
    (each entry point raises), with the cpu preset all three are (the same spies record them)."""
    import sample
    import train
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)        # keep pytest's own signal handlers
    calls = set()
    poison(monkeypatch, None if preset == "paper" else calls)
    run = tmp_path / preset
    train.main(["--data", "circles", "--preset", preset, "--out", str(run), "--steps", "2", "--classifier-steps", "2",
                "--eval-samples", "2", "--sample-steps", "2", "--model-channels", "8", "--classifier-width", "8",
                "--channel-mult", "1,2", "--attention-resolutions", "none", "--image-size", "16", "--no-overlap",
                "--diffusion-steps", "40"])
    config = __import__("json").loads((run / "config.json").read_text())
    paper = preset == "paper"
    assert config["dc_correction"] is not paper and (config["guide_t_min"] == 0) is paper
    assert config["classifier"]["mirror_equivariant"] is not paper
    sample.main(["--run", str(run), "--lambdas", "30,30", "--num-samples", "2"])
    assert calls == (set() if paper else {"dc_corrected", "MirrorEquivariant", "guidance_window"})


def test_dc_wrapper_passes_the_models_inputs_through_and_returns_float32():
    """The wrapped network gets exactly (x_t, t, **kwargs); a float64 prior still gives a float32 ε̂."""
    seen = {}

    def model(x, t, **kwargs):
        seen.update(x=x, t=t, kwargs=kwargs)
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    d = GaussianDiffusion(SMALL_BETAS)
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([0, 2])
    out = dc_corrected(model, d, np.array([0.1, 0.2, 0.3]), np.array([0.0, 0.1, 0.2]))(x, t, y=torch.tensor([1, 0]))
    assert seen["x"] is x and seen["t"] is t and list(seen["kwargs"]) == ["y"] and seen["kwargs"]["y"].tolist() == [1, 0]
    assert out.dtype == torch.float32 and out.shape == (2, 6, 2, 2)


def test_mirror_wrapper_state_dict_takes_the_modules_arguments():
    torch.manual_seed(0)
    inner = ClassifierConfig(**SMALL).build()
    wrapped = MirrorEquivariant(inner)
    assert list(wrapped.state_dict(prefix="clf.")) == list(inner.state_dict(prefix="clf."))
    with pytest.warns(FutureWarning):
        assert list(wrapped.state_dict(None, "p.")) == list(inner.state_dict(prefix="p."))   # positional, deprecated
    partial = {k: v for i, (k, v) in enumerate(inner.state_dict().items()) if i}              # one entry missing
    first = next(iter(inner.state_dict()))
    assert wrapped.load_state_dict(partial, strict=False).missing_keys == [first]
    assert wrapped.load_state_dict(partial, False).missing_keys == [first]
