"""scripts/repeat.py over guidance-classifier seeds (circles and CelebA: mean ± std and the figure of the seeds), and the
sample files in guided-diffusion's layout (`arr_0`, uint8 NHWC) with files of the older layout (`images`) still read."""
import json
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from blobs import middle_fraction, single_circle_x
from celeba_tree import make_celeba_tree
from cli import InputError
from evaluate import load_samples, save_samples
from scripts.repeat import plot_seed_histograms
from test_celeba_pipeline import recomputed_scores
from test_cli import run, tiny_run  # noqa: F401  (module fixture: a 16x16 circles run with a classifier)

CLASSIFIERS = "--train-args=--classifier-steps 2 --classifier-width 8"


def write_old_layout(path):
    """Rewrite a sample file as the project wrote it before guided-diffusion's layout: the images under `images`."""
    images = np.load(path)["arr_0"]
    np.savez_compressed(path, images=images)
    return images


def band(per_seed, bins):
    """Mean and std (ddof=1) over seeds of the density histograms on [0, 1] (np.histogram, the oracle)."""
    d = np.stack([np.histogram(v, bins=bins, range=(0, 1), density=True)[0] if len(v) else np.zeros(bins)
                  for v in per_seed])
    return d.mean(0), d.std(0, ddof=1)


# ---------------------------------------------------------------------------------------------------
# Sample files: arr_0
# ---------------------------------------------------------------------------------------------------

def test_samples_npz_is_guided_diffusion_layout_with_one_copy_of_the_images(tiny_run):  # noqa: F811
    run("sample.py", "--run", tiny_run, "--num-samples", "3", "--sample-steps", "2", "--name", "npz")
    path = tiny_run / "samples" / "npz" / "samples.npz"
    samples = np.load(path)["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (3, 16, 16, 3)
    with zipfile.ZipFile(path) as z:                         # the images once: no second key holds them
        assert sorted(z.namelist()) == ["arr_0.npy", "batch_size.npy", "classifiers.npy", "lambdas.npy", "seed.npy"]
        with z.open("arr_0.npy") as f:                       # read as guided-diffusion's evaluator streams it
            version = np.lib.format.read_magic(f)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(f)
            raw = np.frombuffer(f.read(), dtype=dtype)
    assert shape == (3, 16, 16, 3) and not fortran and dtype == np.uint8 and np.array_equal(raw.reshape(shape), samples)
    # the same samples as grid.png shows them: 10 per row, 1 px grey padding, upscaled (nearest)
    grid = np.asarray(Image.open(path.parent / "grid.png").convert("RGB"))
    scale = grid.shape[0] // 18
    assert grid.shape == (18 * scale, 171 * scale, 3)
    grid = grid[::scale, ::scale]
    for i in range(3):
        assert np.array_equal(grid[1:17, 1 + 17 * i: 17 + 17 * i], samples[i])


def test_old_sample_files_are_still_read(tiny_run, tmp_path):  # noqa: F811
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez_compressed(tmp_path / "old.npz", images=images, seed=0)
    save_samples(tmp_path / "new.npz", images, seed=0)
    assert np.array_equal(load_samples(tmp_path / "old.npz"), images)
    assert np.array_equal(load_samples(tmp_path / "new.npz"), images)
    assert np.array_equal(np.load(tmp_path / "new.npz")["arr_0"], images) and "images" not in np.load(tmp_path / "new.npz")
    np.savez_compressed(tmp_path / "none.npz", slerp=images)
    with pytest.raises(InputError, match="no key arr_0 or images"):
        load_samples(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="uint8"):
        save_samples(tmp_path / "f.npz", images.astype(np.float32))
    # a run whose unguided samples are in the older layout: sample.py still draws the overview next to them
    run_dir = tmp_path / "old_run"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("samples"))
    write_old_layout(run_dir / "ddpm_samples.npz")
    run("sample.py", "--run", run_dir, "--num-samples", "2", "--sample-steps", "2", "--name", "s")
    assert (run_dir / "samples" / "s" / "overview.png").exists()


# ---------------------------------------------------------------------------------------------------
# The figure of the seeds
# ---------------------------------------------------------------------------------------------------

def test_seed_histograms_band_by_hand(tmp_path):
    # two bins on [0, 1]; densities = fraction / 0.5. Seed 1: 2 of 4 per bin -> (1, 1); seed 2: (0, 2); seed 3: none.
    stats = plot_seed_histograms({"a": [[0.1, 0.1, 0.6, 0.9], [0.6]], "b": [[0.2], [0.7], []], "c": [[0.3]]},
                                 tmp_path / "f.png", "x", bins=2, reference={"ref": [0.4]})
    edges, mean, std = stats["a"]
    np.testing.assert_allclose(edges, [0, 0.5, 1])
    np.testing.assert_allclose(mean, [0.5, 1.5])
    np.testing.assert_allclose(std, [np.sqrt(0.5), np.sqrt(0.5)])            # |1 - 0| / sqrt(2), ddof = 1
    np.testing.assert_allclose(stats["b"][1], [2 / 3, 2 / 3])                 # (2, 0), (0, 2), (0, 0)
    np.testing.assert_allclose(stats["b"][2], [np.sqrt(4 / 3), np.sqrt(4 / 3)])
    np.testing.assert_allclose(stats["c"][2], [0, 0])                         # one seed: no spread
    with Image.open(tmp_path / "f.png") as img:
        img.load()
        assert img.size == (3 * 660, 432)                                     # 5.5 x 3.6 inches per panel, 120 dpi


def test_seed_histograms_band_stays_at_or_above_zero(tmp_path, monkeypatch):
    # b's mean 2/3 and std sqrt(4/3) per bin (test above): mean - std < 0, a density the band must not draw
    import matplotlib.axes
    calls, stairs = [], matplotlib.axes.Axes.stairs
    monkeypatch.setattr(matplotlib.axes.Axes, "stairs", lambda ax, *a, **k: calls.append(k) or stairs(ax, *a, **k))
    plot_seed_histograms({"b": [[0.2], [0.7], []]}, tmp_path / "f.png", "x", bins=2)
    (band,) = [k for k in calls if k.get("fill")]
    np.testing.assert_allclose(band["baseline"], [0, 0])


def test_circles_repeat_writes_its_figure(tiny_run, tmp_path):  # noqa: F811
    run_dir = tmp_path / "rep"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("samples"))
    run("scripts/repeat.py", "--run", run_dir, "--seeds", "2", "--variants", "plain", "--num-samples", "4", "--tag", "_f",
        CLASSIFIERS, "--sample-args=--sample-steps 2")
    summary = json.loads((run_dir / "repeats_f.json").read_text())
    xs = [[x for x in single_circle_x(np.load(run_dir / "samples" / f"repeat_plain_f_seed{s}" / "samples.npz")["arr_0"])
           if x is not None] for s in (1, 2)]
    mean, std = band(xs, 50)
    np.testing.assert_allclose(summary["plain_f"]["histogram"]["mean"], mean, atol=1e-9)
    np.testing.assert_allclose(summary["plain_f"]["histogram"]["std"], std, atol=1e-9)
    acc = [json.loads((run_dir / "samples" / f"repeat_plain_f_seed{s}" / "report.json").read_text())["accuracy_middle"]
           for s in (1, 2)]
    assert summary["plain_f"]["accuracy_mean"] == pytest.approx(np.mean(acc))
    assert summary["plain_f"]["accuracy_std"] == pytest.approx(np.std(acc, ddof=1))
    with Image.open(run_dir / "repeats_f.png") as img:
        img.load()
        assert img.size == (660, 432)
    assert "![each seed's histogram and the mean ± std band](repeats_f.png)" in (run_dir / "repeats_f.md").read_text()


# ---------------------------------------------------------------------------------------------------
# CelebA: guidance classifiers of several seeds, scored by the run's evaluation classifier
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smile(tmp_path_factory):
    """A 16x16 CelebA-format run: an evaluator of 30 steps (its calibrated p spreads over (0, 1)), a DDPM and a
    guidance classifier of 2 steps each, guidance at every step (the paper's; the cpu preset's starts at 3T/8)."""
    root = tmp_path_factory.mktemp("tree")
    make_celeba_tree(root, n=60, seed=3)
    out = tmp_path_factory.mktemp("smile") / "run"
    common = ["--data", "celeba", "--data-dir", root, "--attr", "Smiling", "--out", out, "--image-size", "16",
              "--log-every", "50"]
    run("train.py", *common, "--what", "evaluator", "--eval-width", "8", "--eval-steps", "30")
    run("train.py", *common, "--model-channels", "8", "--classifier-width", "8", "--channel-mult", "1,2", "--steps", "2",
        "--classifier-steps", "2", "--sample-steps", "2", "--eval-samples", "8", "--guide-t-min", "0")
    return out


def evaluator_p(images, path):
    """p(class 1) of the evaluation classifier (temperature included), computed here."""
    from appendix.evaluator import load_evaluator
    model, _ = load_evaluator(path)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return torch.softmax(model(x), 1)[:, 1].numpy().astype(np.float64)


def test_celeba_repeat_over_classifier_seeds(smile):
    unguided = write_old_layout(smile / "ddpm_samples.npz")     # read through the older layout too
    # λ large: two classifiers of 2 steps each move the samples apart
    run("scripts/repeat.py", "--run", smile, "--seeds", "2", "--variants", "plain", "--num-samples", "48", "--tag", "_t",
        "--lambdas", "3000,3000", CLASSIFIERS, "--sample-args=--sample-steps 3")
    summary = json.loads((smile / "repeats_t.json").read_text())
    assert set(summary) == {"unguided", "plain_t"} and summary["plain_t"]["runs"] == 2
    folders = [smile / "samples" / f"repeat_plain_t_seed{s}" for s in (1, 2)]
    reports = [json.loads((f / "report.json").read_text()) for f in folders]
    table = (smile / "repeats_t.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| plain_t | 2 |"))
    cells = re.findall(r"([\d.]+) ± ([\d.]+)", row)
    for k, metric in enumerate(("kld_paper", "mse_paper", "kld_01", "l2_01")):
        values = [r[f"{metric}_plain_t_seed{s}3000-3000"] for r, s in zip(reports, (1, 2))]
        mean, std = np.mean(values), np.std(values, ddof=1)
        assert summary["plain_t"][f"{metric}_mean"] == pytest.approx(mean)
        assert summary["plain_t"][f"{metric}_std"] == pytest.approx(std)
        assert cells[k] == (f"{mean:.3f}", f"{std:.3f}")
    assert reports[0]["kld_01_plain_t_seed13000-3000"] != reports[1]["kld_01_plain_t_seed23000-3000"]  # a real spread
    # the unguided reference of every guided report: the older-layout ddpm_samples.npz, scored here
    expected = recomputed_scores(unguided, smile / "evaluator_Smiling.pt")
    assert reports[0]["kld_01_unguided"] == pytest.approx(expected["kld_01"], rel=1e-6, abs=1e-9)
    # the figure: each seed's histogram of p(class 1) (100 bins on [0, 1]) and their mean ± std
    mean, std = band([evaluator_p(np.load(f / "samples.npz")["arr_0"], smile / "evaluator_Smiling.pt")
                      for f in folders], 100)
    np.testing.assert_allclose(summary["plain_t"]["histogram"]["mean"], mean, atol=1e-6)
    np.testing.assert_allclose(summary["plain_t"]["histogram"]["std"], std, atol=1e-6)
    with Image.open(smile / "repeats_t.png") as img:
        img.load()
        assert img.size == (660, 432)


def test_repeat_over_seeds_writes_mean_and_std(tiny_run, tmp_path):
    run_dir = tmp_path / "rep"
    shutil.copytree(tiny_run, run_dir)
    run("scripts/repeat.py", "--run", run_dir, "--seeds", "2", "--num-samples", "2", "--tag", "_t",
        "--train-args=--classifier-steps 2 --classifier-width 8", "--sample-args=--sample-steps 2")
    summary = json.loads((run_dir / "repeats_t.json").read_text())
    assert set(summary) == {"unguided", "plain_t", "sn_t"}
    assert summary["plain_t"]["runs"] == 2 and summary["sn_t"]["runs"] == 2
    assert 0 <= summary["plain_t"]["accuracy_mean"] <= 1 and summary["plain_t"]["accuracy_std"] >= 0
    # each seed's numbers recounted from its samples (blobs.middle_fraction)
    for variant in ("plain_t", "sn_t"):
        acc = []
        for row in summary[variant]["per_seed"]:
            images = np.load(run_dir / "samples" / f"repeat_{variant}_seed{row['seed']}" / "samples.npz")["arr_0"]
            acc.append(middle_fraction(images)[0])
            assert row["accuracy_middle"] == pytest.approx(acc[-1])
        assert summary[variant]["accuracy_mean"] == pytest.approx((acc[0] + acc[1]) / 2)
        assert summary[variant]["accuracy_std"] == pytest.approx(abs(acc[0] - acc[1]) / 2 ** 0.5)   # ddof = 1
    for variant, seed in (("plain", 1), ("plain", 2), ("sn", 1), ("sn", 2)):
        assert (run_dir / f"{variant}_t_seed{seed}.pt").exists()
    table = (run_dir / "repeats_t.md").read_text()
    assert "mean ± std" in table and f"torch {torch.__version__}." in table
    reference = run_dir / "samples" / "repeat_unguided" / "samples.npz"
    stamp = reference.stat().st_mtime_ns
    run("scripts/repeat.py", "--run", run_dir, "--seeds", "1", "--first-seed", "3", "--variants", "plain", "--num-samples", "2",
        "--tag", "_t", "--train-args=--classifier-steps 2 --classifier-width 8", "--sample-args=--sample-steps 2",
        "--reuse-unguided")
    again = json.loads((run_dir / "repeats_t.json").read_text())
    assert again["unguided"] == summary["unguided"] and again["plain_t"]["per_seed"][0]["seed"] == 3
    assert reference.stat().st_mtime_ns == stamp                     # not sampled again
    proc = run("scripts/repeat.py", "--run", run_dir, "--num-samples", "3", "--reuse-unguided", ok=False)
    assert proc.returncode == 2 and "--num-samples 3" in proc.stderr and "Traceback" not in proc.stderr


def test_repeat_with_changed_classifiers_needs_a_tag(tiny_run):
    proc = run("scripts/repeat.py", "--run", tiny_run, "--train-args=--classifier-steps 2", ok=False)
    assert proc.returncode == 2 and "--tag" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_rows_keep_every_reference_sets_figures():
    from scripts.sweep import row_of
    report = {"guidance": "classifier30-30", "fid_pixels": 5.0, "fid_inception_full": 8.1, "fid_inception_mild": 12.7,
              "precision_inception_mild": 0.75, "kld_paper_classifier30-30": 0.6, "kld_paper": 9.9,
              "kld_paper_training_data": 3.2, "mse_paper_unguided": 0.5,
              "extractor_inception": "FID Inception v3 pool3", "seed": 0}
    assert row_of(report) == {"fid_pixels": 5.0, "fid_inception_full": 8.1, "fid_inception_mild": 12.7,
                              "precision_inception_mild": 0.75, "kld_paper": 0.6}


def test_repeat_checks_the_classifiers_flags_before_sampling_anything(tiny_run, tmp_path):
    run_dir = tmp_path / "rep"
    shutil.copytree(tiny_run, run_dir)
    proc = run("scripts/repeat.py", "--run", run_dir, "--seeds", "1", "--num-samples", "2", "--tag", "_z",
               "--train-args=--classifier-steps 0", ok=False)
    assert proc.returncode == 2 and "--classifier-steps" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "samples" / "repeat_unguided").exists()
    proc = run("scripts/repeat.py", "--run", run_dir, "--evaluator", "e.pt", ok=False)       # circles: no evaluator
    assert proc.returncode == 2 and "drop --evaluator" in proc.stderr
