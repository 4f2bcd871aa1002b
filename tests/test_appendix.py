"""Appendix capabilities: slerp, DDIM interpolation / editing and the quality report through sample.py."""
import json

import numpy as np
import pytest
import torch

from inversion import lerp, slerp
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


def test_interpolate_writes_the_strip_and_positions(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--interpolate", "--points", "3", "--steps", "4", "--name", "interp")
    out = tiny_run / "samples" / "interp"
    data = np.load(out / "samples.npz")
    assert data["slerp"].shape == (3, 16, 16, 3) and data["lerp"].shape == (3, 16, 16, 3)
    report = json.loads((out / "report.json").read_text())
    assert report["t_stop"] == 2 and len(report["slerp_circle_x"]) == 3
    assert (out / "interpolation.png").exists()


def test_edit_moves_images_with_guidance(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--edit", "--lambdas", "30,30", "--num-samples", "4", "--steps", "4",
        "--name", "edit")
    out = tiny_run / "samples" / "edit"
    data = np.load(out / "samples.npz")
    assert data["images"].shape == data["originals"].shape == (4, 16, 16, 3)
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["moved_2px_or_more"] <= 1 and (out / "edit.png").exists()
    proc = run("sample.py", "--run", tiny_run, "--edit", ok=False)          # editing needs guidance
    assert proc.returncode == 2 and "--lambdas" in proc.stderr


def test_quality_report(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--num-samples", "8", "--steps", "2", "--quality", "--name", "q")
    out = tiny_run / "samples" / "q"
    report = json.loads((out / "report.json").read_text())
    for space in ("pixels", "classifier"):
        assert report[f"fid_{space}"] >= 0 and 0 <= report[f"precision_{space}"] <= 1
        assert (out / f"nearest_{space}.png").exists()


def test_classifier_free_training_and_sampling(tmp_path):
    from test_cli import TINY
    out = tmp_path / "cfg"
    run("train.py", *TINY, "--out", out, "--steps", "3", "--what", "ddpm", "--cfg-dropout", "0.2",
        "--eval-samples", "2")
    state = torch.load(out / "ddpm.pt", weights_only=True)
    assert state["config"]["unet"]["num_classes"] == 3                      # left, right, null
    assert state["model"]["label_emb.weight"].shape[0] == 3
    run("sample.py", "--run", out, "--cfg", "3", "--num-samples", "4", "--steps", "3", "--name", "cfg")
    report = json.loads((out / "samples" / "cfg" / "report.json").read_text())
    assert report["guidance"] == "cfg3" and report["num_samples"] == 4
    proc = run("sample.py", "--run", out, "--cfg", "nan", ok=False)
    assert proc.returncode == 2 and "--cfg" in proc.stderr


def test_cfg_needs_a_conditional_run(tiny_run):  # noqa: F811
    proc = run("sample.py", "--run", tiny_run, "--cfg", "3", ok=False)
    assert proc.returncode == 2 and "--cfg-dropout" in proc.stderr


def test_dit_shapes_zero_init_and_training(tmp_path):
    from dit import DiTConfig
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
    run("sample.py", "--run", out_dir, "--num-samples", "2", "--steps", "2", "--name", "dit")


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
    run("sample.py", "--run", out, "--lambdas", "30,30", "--num-samples", "3", "--steps", "2", "--name", "s")
    report = json.loads((out / "samples" / "s" / "report.json").read_text())
    assert 0 <= report["accuracy_middle"] <= 1 and (out / "samples" / "s" / "histogram_size.png").exists()
    assert report["accuracy_middle"] + report["larger_than_training"] + report["zero_or_multi"] <= 1 + 1e-9


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
