"""Appendix capabilities: slerp, DDIM interpolation / editing and the quality report through sample.py."""
import json
import math

import numpy as np
import pytest
import torch

from blobs import middle_fraction, single_circle_x
from appendix.inversion import lerp, slerp
from test_cli import run, tiny_run  # noqa: F401  (module fixture: a 16x16 run with a classifier)


def test_slerp_endpoints_norm_and_midpoint():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    # orthogonal unit vectors: the midpoint stays on the unit circle (lerp shrinks it to 1/sqrt 2)
    e0, e1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert slerp(e0, e1, 0.5).norm().item() == pytest.approx(1.0)
    assert lerp(e0, e1, 0.5).norm().item() == pytest.approx(2 ** -0.5)
    # parallel latents fall back to lerp instead of dividing by sin 0
    torch.testing.assert_close(slerp(e0, 2 * e0, 0.5), 1.5 * e0)


def test_slerp_keeps_the_latents_device():
    # Found on a GPU: the lerp fallback weights were made on the CPU. "meta" tensors catch a mixed-device op here.
    a, b = torch.randn(2, 3, 4, 4, device="meta"), torch.randn(2, 3, 4, 4, device="meta")
    assert slerp(a, b, 0.3).device.type == "meta"


def test_edit_runs_ddim_with_eta_t_equal_to_t_over_t_start():
    """App. N: invert to t_start (t_start deterministic steps up), then guided DDIM from t_start down to 0 with
    η_t = t / t_start at respaced index t, noise drawn only where η_t > 0, the guidance at every step."""
    from appendix import inversion
    from ddpm import DiffusionConfig
    chain = DiffusionConfig(diffusion_steps=1000).build().respace(10)
    steps, reverse = [], []
    ddim_sample, ddim_reverse_sample = chain.ddim_sample, chain.ddim_reverse_sample

    def spy(model, x, t, cond_fn=None, eta=0.0, noise=None, **kw):
        steps.append((int(t[0]), eta, noise is not None, cond_fn is guide))
        return ddim_sample(model, x, t, cond_fn=cond_fn, eta=eta, noise=noise, **kw)

    def spy_reverse(model, x, t, **kw):
        reverse.append(int(t[0]))
        return ddim_reverse_sample(model, x, t, **kw)

    chain.ddim_sample, chain.ddim_reverse_sample = spy, spy_reverse
    model = lambda x, t: torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    guide = lambda x, t: torch.zeros_like(x)
    inversion.edit(chain, model, torch.zeros(2, 3, 4, 4), 5, guide, generator=torch.Generator().manual_seed(0))
    assert reverse == [0, 1, 2, 3, 4]
    assert [s[0] for s in steps] == [5, 4, 3, 2, 1, 0]
    assert [s[1] for s in steps] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], abs=1e-12)
    assert [s[2] for s in steps] == [True] * 5 + [False] and all(s[3] for s in steps)


def test_interpolate_writes_the_strip_and_positions(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--interpolate", "--points", "3", "--sample-steps", "4", "--name", "interp")
    out = tiny_run / "samples" / "interp"
    data = np.load(out / "samples.npz")
    assert data["slerp"].shape == (3, 16, 16, 3) and data["lerp"].shape == (3, 16, 16, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["t_stop"] == 2 and len(report["slerp_circle_x"]) == 3
    assert (out / "interpolation.png").exists()
    for path in ("slerp", "lerp"):           # the reported positions, recounted from the written strip
        xs = single_circle_x(data[path])
        assert [x is None for x in xs] == [r is None for r in report[f"{path}_circle_x"]]
        assert [r for r in report[f"{path}_circle_x"] if r is not None] == pytest.approx(
            [x for x in xs if x is not None], abs=5e-4)
        assert report[f"{path}_in_middle"] == pytest.approx(middle_fraction(data[path])[0])


def test_edit_moves_images_with_guidance(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--edit", "--lambdas", "30,30", "--num-samples", "4", "--sample-steps", "4",
        "--name", "edit")
    out = tiny_run / "samples" / "edit"
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == data["originals"].shape == (4, 16, 16, 3)
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["moved_2px_or_more"] <= 1 and (out / "edit.png").exists()
    # the edited images are the first 4 training circles; the numbers recounted from the written images
    from data import circles_dataset
    d = json.loads((tiny_run / "config.json").read_text())["data"]
    assert np.array_equal(data["originals"], circles_dataset(16, d["radius"], d["delta"], seed=d["seed"])[0][:4])
    before, after = single_circle_x(data["originals"]), single_circle_x(data["arr_0"])
    moved = sum(a is not None and b is not None and abs(a - b) * 16 >= 2 for a, b in zip(after, before))
    assert report["images"] == 4 and report["moved_2px_or_more"] == pytest.approx(moved / 4)
    assert report["edited_in_middle"] == pytest.approx(middle_fraction(data["arr_0"])[0])
    assert report["edited_zero_or_multi"] == pytest.approx(middle_fraction(data["arr_0"])[1])
    assert report["originals_in_middle"] == 0                   # training circles sit at the borders
    proc = run("sample.py", "--run", tiny_run, "--edit", ok=False)          # editing needs guidance
    assert proc.returncode == 2 and "--lambdas" in proc.stderr


def test_edit_towards_one_class_inverts_the_other_class(tiny_run):  # noqa: F811
    """App. N edits non-smiling faces with classifier guidance towards smiling: `--lambdas 0,30` on circles inverts
    the first left-border (class 0) training circles, the images guidance pulls towards the other class."""
    run("sample.py", "--run", tiny_run, "--edit", "--lambdas", "0,30", "--num-samples", "3", "--sample-steps", "4",
        "--name", "edit_one_class")
    data = np.load(tiny_run / "samples" / "edit_one_class" / "samples.npz")
    from data import circles_dataset
    d = json.loads((tiny_run / "config.json").read_text())["data"]
    images, labels, _ = circles_dataset(16, d["radius"], d["delta"], seed=d["seed"])
    assert np.array_equal(data["originals"], images[labels == 0][:3])
    assert all(x is not None and x < 0.5 for x in single_circle_x(data["originals"]))


def test_quality_report(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--num-samples", "8", "--sample-steps", "2", "--quality", "--name", "q")
    out = tiny_run / "samples" / "q"
    report = json.loads((out / "report.json").read_text())
    for space in ("pixels", "classifier"):
        assert report[f"fid_{space}"] >= 0 and 0 <= report[f"precision_{space}"] <= 1
        assert (out / f"nearest_{space}.png").exists()
    # pixel space recomputed from the written samples against the reference (every circle position, App. I)
    from data import circles_dataset
    d = json.loads((tiny_run / "config.json").read_text())["data"]
    feats = lambda imgs: imgs.reshape(len(imgs), -1).astype(np.float64) / 127.5 - 1
    fake = feats(np.load(out / "samples.npz")["arr_0"])
    real = feats(circles_dataset(16, d["radius"], d["delta"], full_range=True)[0])
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    # Tr (Σ1 Σ2)^½ = Σ sqrt(eigenvalues of Σ1 Σ2) (real and >= 0: Σ1 Σ2 is similar to Σ1^½ Σ2 Σ1^½)
    cross = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    fid = ((real.mean(0) - fake.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross
    assert report["fid_pixels"] == pytest.approx(fid, rel=1e-4)

    def inside(ref, query, k=3):        # fraction of `query` within the k-th-neighbour ball of some `ref` point
        d_ref = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
        radius = np.sort(d_ref, axis=1)[:, k]
        return np.mean([(np.linalg.norm(ref - q, axis=1) <= radius).any() for q in query])
    assert report["precision_pixels"] == pytest.approx(inside(real, fake))
    assert report["recall_pixels"] == pytest.approx(inside(fake, real))


def test_classifier_free_training_and_sampling(tmp_path):
    from test_cli import TINY
    out = tmp_path / "cfg"
    run("train.py", *TINY, "--out", out, "--steps", "3", "--what", "ddpm", "--cfg-dropout", "0.2",
        "--eval-samples", "2")
    state = torch.load(out / "ddpm.pt", weights_only=True)
    assert state["config"]["unet"]["num_classes"] == 3                      # left, right, null
    assert state["model"]["label_emb.weight"].shape[0] == 3
    run("sample.py", "--run", out, "--cfg-scale", "3", "--num-samples", "4", "--sample-steps", "3", "--name", "cfg")
    report = json.loads((out / "samples" / "cfg" / "report.json").read_text())
    assert report["guidance"] == "cfg3" and report["num_samples"] == 4
    proc = run("sample.py", "--run", out, "--cfg-scale", "nan", ok=False)
    assert proc.returncode == 2 and "--cfg" in proc.stderr


def test_cfg_needs_a_conditional_run(tiny_run):  # noqa: F811
    proc = run("sample.py", "--run", tiny_run, "--cfg-scale", "3", ok=False)
    assert proc.returncode == 2 and "--cfg-dropout" in proc.stderr


def test_dit_shapes_zero_init_and_training(tmp_path):
    from appendix.dit import DiTConfig
    from test_cli import TINY
    net = DiTConfig(image_size=16, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=3).build()
    x, t = torch.randn(5, 3, 16, 16), torch.randint(0, 4000, (5,))
    out = net(x, t, y=torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == (5, 6, 16, 16) and out.dtype == torch.float32
    assert out.abs().max() == 0                                   # adaLN-Zero + zero final layer
    # unpatchify inverts the patch layout: token (i, j), channel block k -> pixel (p*i + a, p*j + b)
    tokens = torch.arange(64 * 4 * 6, dtype=torch.float32).reshape(1, 64, 24)
    img = net.unpatchify(tokens)
    assert img[0, 5, 2 * 3 + 1, 2 * 4 + 0] == tokens[0, 3 * 8 + 4, (1 * 2 + 0) * 6 + 5]
    out_dir = tmp_path / "dit"
    run("train.py", *TINY, "--out", out_dir, "--arch", "dit", "--dit-hidden", "32", "--dit-depth", "1",
        "--steps", "3", "--what", "ddpm", "--eval-samples", "2")
    state = torch.load(out_dir / "ddpm.pt", weights_only=True)
    assert state["config"]["arch"] == "dit" and "blocks.0.qkv.weight" in state["model"]
    run("sample.py", "--run", out_dir, "--num-samples", "2", "--sample-steps", "2", "--name", "dit")


def test_sizes_dataset_and_size_regression():
    from data import render_circles, sizes_dataset
    from evaluate import size_metrics
    images, labels, radii = sizes_dataset(32, 2, 11, 0.2)
    assert set(radii) == {2, 3, 10, 11} and np.array_equal(labels, (radii > 6.5).astype(int))
    assert len(images) == 4 * 10 * 10
    full = sizes_dataset(32, 2, 11, 0.2, full_range=True)[2]
    assert set(full) == set(range(2, 12))
    # the area-based radius estimate is within a quarter pixel of the drawn radius at every size
    discs = np.concatenate([render_circles(np.array([[16, 16]]), 32, r) for r in range(2, 12)])
    m = size_metrics(discs, 2, 11)
    assert np.abs(m["radius"] - np.arange(2, 12)).max() < 0.25
    z = (np.arange(2, 12) - 2) / 9
    assert m["accuracy"] == pytest.approx(((z >= 0.2) & (z <= 0.8)).mean())


def test_sizes_end_to_end(tmp_path):
    from test_cli import TINY
    out = tmp_path / "sizes"
    args = [a for a in TINY if a != "circles"]
    args[args.index("--data") + 1:args.index("--data") + 1] = ["sizes"]
    args[args.index("--image-size") + 1] = "32"
    run("train.py", *args, "--out", out, "--steps", "2", "--classifier-steps", "2", "--channel-mult", "1,2",
        "--eval-samples", "0")
    run("sample.py", "--run", out, "--lambdas", "30,30", "--num-samples", "3", "--sample-steps", "2", "--name", "s")
    report = json.loads((out / "samples" / "s" / "report.json").read_text())
    assert 0 <= report["accuracy_middle"] <= 1 and (out / "samples" / "s" / "histogram_size.png").exists()
    assert report["accuracy_middle"] + report["larger_than_training"] + report["zero_or_multi"] <= 1 + 1e-9
    # recounted from the written samples: a single blob's radius is sqrt(area / π) - 1/2 (App. K), z normalised
    from blobs import blobs
    d = json.loads((out / "config.json").read_text())["data"]
    found = [blobs(img) for img in np.load(out / "samples" / "s" / "samples.npz")["arr_0"]]
    z = [(np.sqrt(b[0][0] / np.pi) - 0.5 - d["r_min"]) / (d["r_max"] - d["r_min"]) for b in found if len(b) == 1]
    assert report["accuracy_middle"] == pytest.approx(sum(0.2 <= v <= 0.8 for v in z) / 3)
    assert report["larger_than_training"] == pytest.approx(sum(v > 1 for v in z) / 3)
    assert report["zero_or_multi"] == pytest.approx(sum(len(b) != 1 for b in found) / 3)


def test_size_metrics_sort_middle_oversized_and_broken():
    """A middle-sized disc, a disc larger than any training disc, two discs, and nothing."""
    from data import render_circles
    from evaluate import size_metrics
    mid = render_circles(np.array([[16, 16]]), 32, radius=6)            # z = (6 - 2) / 9 = 0.44
    big = render_circles(np.array([[16, 16]]), 32, radius=13)           # z = 1.22 > 1
    two = np.maximum(render_circles(np.array([[6, 6]]), 32, 2), render_circles(np.array([[24, 24]]), 32, 2))
    m = size_metrics(np.concatenate([mid, big, two, np.zeros_like(mid)]), r_min=2, r_max=11)
    assert m["accuracy"] == 0.25 and m["invalid"] == 0.5
    assert m["z"][0] == pytest.approx(4 / 9, abs=0.05) and m["z"][1] > 1


def test_sample_labels_name_the_guidance():
    from sample import sample_label
    assert sample_label([], None) == "unguided"
    assert sample_label([[30.0, 30.0]], None) == "λ = 30,30"
    assert sample_label([], 3.0) == "CFG w = 3"          # CFG samples are not "unguided" (histogram legend)
    assert sample_label([[10.0, 0.0]], 0.1) == "λ = 10,0, CFG w = 0.1"


def test_interpolate_decodes_slerp_and_lerp_paths_between_the_two_latents():
    """App. M with a stand-in chain: invert(x_a, x_b) -> z = 2x + 1; the path at α = 0, 1/2, 1 (slerp and lerp);
    each path decoded by DDIM η = 0 from the same respaced index, without guidance."""
    from appendix import inversion
    class Chain:
        num_timesteps = 10

        def __init__(self):
            self.calls = []

        def ddim_reverse_loop(self, model, x, t_stop):
            self.calls.append(("invert", t_stop, x.clone()))
            return 2 * x + 1

        def ddim_sample_loop(self, model, shape, noise=None, t_start=None, eta=None, cond_fn=None, generator=None,
                             device=None):
            self.calls.append(("decode", t_start, eta, cond_fn, generator, device, tuple(shape)))
            return noise - 1

    chain, model = Chain(), object()
    x_a, x_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    out, alphas = inversion.interpolate(chain, model, x_a, x_b, 4, points=3)
    assert alphas.tolist() == [0, 0.5, 1] and set(out) == {"slerp", "lerp"}
    assert chain.calls[0][:2] == ("invert", 4) and torch.equal(chain.calls[0][2], torch.stack([x_a, x_b]))
    assert [c[:6] for c in chain.calls[1:]] == [("decode", 4, 0.0, None, None, torch.device("cpu"))] * 2
    assert chain.calls[1][6] == chain.calls[2][6] == (3, 1, 2)
    z0, z1 = 2 * x_a + 1, 2 * x_b + 1                                    # (3, 1) and (1, 7)
    torch.testing.assert_close(out["lerp"], torch.stack([z0, (z0 + z1) / 2, z1]) - 1)
    theta = math.acos(10 / math.sqrt(10 * 50))                            # angle between (3, 1) and (1, 7)
    mid = (z0 + z1) * math.sin(theta / 2) / math.sin(theta)
    torch.testing.assert_close(out["slerp"], torch.stack([z0, mid, z1]) - 1)
    with pytest.raises(ValueError, match="outside 1..9"):
        inversion.interpolate(chain, model, x_a, x_b, 10)


def test_slerp_by_hand_per_row_and_the_exact_lerp_fallback():
    """Row-wise angles (a batch of two with different angles), norms below 1 (no clamping of |a||b|), and the lerp
    weights in the latents' own dtype when the two are parallel."""
    a = torch.tensor([[0.3, 0.1], [0.2, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.1, 0.7], [0.0, 0.5]], dtype=torch.float64)
    out = slerp(a, b, 0.25)
    for i in range(2):
        cos = float(a[i] @ b[i]) / float(a[i].norm() * b[i].norm())
        th = math.acos(cos)
        want = (math.sin(0.75 * th) * a[i] + math.sin(0.25 * th) * b[i]) / math.sin(th)
        torch.testing.assert_close(out[i], want, rtol=1e-12, atol=1e-12)
    z = torch.tensor([[0.3, -1.7, 2.2]], dtype=torch.float64)
    torch.testing.assert_close(slerp(z, 3 * z, 0.3), 0.7 * z + 0.3 * 3 * z, rtol=1e-15, atol=1e-15)


def test_edit_passes_its_generator_and_guidance_to_the_decoder():
    from appendix import inversion
    class Chain:
        num_timesteps = 10
        seen = {}

        def ddim_reverse_loop(self, model, x, t_stop):
            return x

        def ddim_sample_loop(self, model, shape, **kwargs):
            self.seen.update(kwargs)
            return kwargs["noise"]

    g, guide = torch.Generator(), (lambda x, t: x)
    inversion.edit(Chain(), None, torch.zeros(1, 2), 4, guide, generator=g)
    assert Chain.seen["generator"] is g and Chain.seen["cond_fn"] is guide and Chain.seen["t_start"] == 4
    assert [Chain.seen["eta"](i) for i in (4, 2, 0)] == [1.0, 0.5, 0.0]


def test_size_metrics_counts_samples_and_invalid_fraction():
    from data import render_circles
    from evaluate import size_metrics
    one = render_circles(np.array([[16, 16]]), 32, radius=6)
    m = size_metrics(np.concatenate([one, one, np.zeros_like(one)]), r_min=2, r_max=11)
    assert m["n"] == 3 and m["invalid"] == pytest.approx(1 / 3) and m["accuracy"] == pytest.approx(2 / 3)


def test_interpolate_passes_the_model_uses_nine_points_and_accepts_the_first_latent():
    """The model reaches both the inversion and every decode; the default path has 9 points, α = j/8; t_stop = 1
    (the least noisy latent) is valid for invert, decode and interpolate."""
    from appendix import inversion
    class Chain:
        num_timesteps = 10

        def __init__(self):
            self.models = []

        def ddim_reverse_loop(self, model, x, t_stop):
            self.models.append(model)
            return x

        def ddim_sample_loop(self, model, shape, noise=None, **kwargs):
            self.models.append(model)
            return noise

    chain, model = Chain(), object()
    x_a, x_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out, alphas = inversion.interpolate(chain, model, x_a, x_b, 1)
    assert alphas.tolist() == [j / 8 for j in range(9)]
    assert out["lerp"].shape == out["slerp"].shape == (9, 1, 2)
    assert len(chain.models) == 3 and all(m is model for m in chain.models)
    torch.testing.assert_close(out["lerp"][:, 0], torch.tensor([[1 - j / 8, j / 8] for j in range(9)]))
    assert torch.equal(inversion.invert(chain, model, x_a, 1), x_a)
    assert torch.equal(inversion.decode(chain, model, x_a, 1), x_a)


def test_a_classifier_trained_on_another_image_folder_guides_the_run(tiny_run, tmp_path):
    """App. E's recipe (a guidance classifier trained on separate, synthetic images: faces with / without green lips)
    and App. L's (classes of one's own data): a classifier of a folder of `{label}_{k}.png` files guides a run's DDPM
    through `--classifier PATH`, and the sample file names that classifier."""
    from PIL import Image
    folder = tmp_path / "patches"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        if k % 2:
            img[6:10, 4:12] = (40, 220, 40)                  # class 1: a green patch (the "green lips")
        Image.fromarray(img).save(folder / f"{k % 2}_{k}.png")
    other = tmp_path / "greenlips"
    run("train.py", "--data", "folder", "--data-dir", folder, "--image-size", "16", "--model-channels", "8",
        "--classifier-width", "8", "--what", "classifier", "--classifier-steps", "2", "--out", other,
        "--log-every", "1", "--ckpt-every", "2")
    run("sample.py", "--run", tiny_run, "--classifier", other / "classifier.pt", "--lambdas", "0,30",
        "--num-samples", "2", "--sample-steps", "2", "--name", "green")
    report = json.loads((tiny_run / "samples" / "green" / "report.json").read_text())
    assert report["lambdas"] == "[[0.0, 30.0]]" and report["guidance"].startswith("classifier")
    saved = np.load(tiny_run / "samples" / "green" / "samples.npz")
    assert saved["arr_0"].shape == (2, 16, 16, 3)
    assert json.loads(str(saved["classifiers"])) == [str(other / "classifier.pt")]
