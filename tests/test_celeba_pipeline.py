"""The whole CelebA chain on a generated CelebA-format tree: evaluator -> App. D filter -> DDPM + guidance
classifier on the subset -> multi-guided samples scored by the evaluator (histogram, KLD, Fig. 9 heatmap)."""
import json

import numpy as np
import pytest
import torch

from celeba_tree import make_celeba_tree
from test_cli import run

SMALL = ["--image-size", "32", "--eval-width", "8", "--eval-steps", "80", "--log-every", "50"]
DDPM = ["--model-channels", "8", "--classifier-width", "8", "--sample-steps", "2", "--eval-samples", "4",
        "--steps", "2", "--classifier-steps", "2", "--channel-mult", "1,2"]


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    latent = make_celeba_tree(root, n=360, seed=3)
    out = tmp_path_factory.mktemp("smile") / "run"
    run("train.py", "--data", "celeba", "--data-dir", root, "--attr", "Smiling", "--what", "evaluator",
        "--out", out, *SMALL)
    return root, latent, out


def recomputed_scores(images, evaluator):
    """The report's numbers for these samples, recomputed here: p(class 1) from the evaluator (temperature
    included), the 100-bin histograms over [min p, max p] (the paper's) and over [0, 1], and from each the KLD
    Σ h ln(100 h) and the L2 norm ||h - 1/100|| to uniform ([ZSI] App. B); and the count of p in
    [0.49, 0.51]."""
    from appendix.evaluator import load_evaluator
    model, _ = load_evaluator(evaluator)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        p = torch.softmax(model(x), dim=1)[:, 1].numpy().astype(np.float64)
    out = dict(mild_049_051=int(((p >= 0.49) & (p <= 0.51)).sum()))
    for name, span in (("paper", (p.min(), p.max()) if p.min() < p.max() else (p.min() - 0.5, p.max() + 0.5)),
                       ("01", (0.0, 1.0))):
        h = np.histogram(p, bins=100, range=span)[0] / len(p)
        kld = sum(v * np.log(100 * v) for v in h if v > 0)
        out["kld_" + name] = kld
        out["mse_paper" if name == "paper" else "l2_01"] = np.sqrt(((h - 0.01) ** 2).sum())
    return out


def test_evaluator_learns_the_attribute_and_is_calibrated(celeba):
    _, _, out = celeba
    report = json.loads((out / "evaluator_Smiling.json").read_text())
    assert report["val_accuracy"] > 0.75                   # mouth curvature is visible at 32x32
    assert report["nll_after"] <= report["nll_before"] + 1e-6 and report["temperature"] > 0
    # the fitted T moves the 15-bin ECE on the valid split down (measured here: 0.033 -> 0.008 with T = 1.66)
    assert report["ece_after"] < report["ece_before"]
    state = torch.load(out / "evaluator_Smiling.pt", weights_only=True)
    assert state["kind"] == "evaluator" and float(state["model"]["temperature"]) == pytest.approx(report["temperature"])


def test_filter_keeps_the_extremes_nested(celeba):
    root, latent, out = celeba
    run("train.py", "--data", "celeba", "--data-dir", root, "--attr", "Smiling", "--what", "filter",
        "--train-size", "60,30", "--tau1", "0.8", "--tau2", "0.8", "--members", "2", "--out", out, *SMALL)
    train_curv = latent["curvature"][latent["split"] == 0]
    big = np.loadtxt(out / "subset_Smiling_60.txt", dtype=int)
    small = np.loadtxt(out / "subset_Smiling_30.txt", dtype=int)
    assert len(big) == 60 and len(small) == 30 and set(small) <= set(big)
    # mild mouths (|curvature| < 0.2) are filtered out: rarer among the kept examples than in the split
    mild = lambda idx: (np.abs(train_curv[idx]) < 0.2).mean()
    assert mild(big) < mild(np.arange(len(train_curv))) and mild(small) <= mild(np.arange(len(train_curv)))
    assert np.abs(train_curv[big]).mean() > np.abs(train_curv).mean() + 0.05
    assert (train_curv[big] > 0).sum() == 30                  # k per side
    counts = json.loads((out / "subset_Smiling_report.json").read_text())
    assert counts["train"] >= counts["stage1_tau1"] >= counts["stage2_ensemble_tau2"] >= 60
    assert (out / "subset_Smiling_scores.png").exists()


def test_ddpm_on_the_subset_and_scored_samples(celeba):
    root, _, out = celeba
    subset = out / "subset_Smiling_60.txt"
    if not subset.exists():
        pytest.skip("needs test_filter_keeps_the_extremes_nested")
    run("train.py", "--data", "celeba", "--data-dir", root, "--attr", "Smiling", "--subset", subset,
        "--oversample", "0:2", "--out", out, *SMALL, *DDPM)
    run_config = json.loads((out / "config.json").read_text())
    assert run_config["data"]["subset"] == str(subset) and run_config["data"]["oversample"] == "0:2"
    run("sample.py", "--run", out, "--lambdas", "30,30", "--num-samples", "6", "--sample-steps", "2", "--name", "g")
    report = json.loads((out / "samples" / "g" / "report.json").read_text())
    for key in ("kld_paper_training_data", "mse_paper_classifier30-30", "kld_01_unguided"):
        assert report[key] >= 0, key
    samples = np.load(out / "samples" / "g" / "samples.npz")["arr_0"]
    expected = recomputed_scores(samples, out / "evaluator_Smiling.pt")
    assert report["mild_049_051"] == expected.pop("mild_049_051")
    for key, value in expected.items():
        assert report[f"{key}_classifier30-30"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert (out / "samples" / "g" / "histogram_p.png").exists()
    # the λ sweep of Sec. 5.3 / Fig. S13: KLD and "MSE" of the evaluator's histogram for each λ
    run("scripts/sweep.py", "--run", out, "--lambdas", "0,10", "--num-samples", "6", "--sample-args", "--sample-steps 2",
        "--name", "s")
    rows = json.loads((out / "sweeps" / "s" / "sweep.json").read_text())["rows"]
    assert [r["lambda"] for r in rows] == [0.0, 10.0]
    guided = json.loads((out / "samples" / "sweep_s_lambda10" / "report.json").read_text())
    assert rows[1]["kld_paper"] == guided["kld_paper_classifier10-10"] and rows[1]["l2_01"] >= 0
    assert rows[0]["kld_paper"] == json.loads((out / "samples" / "sweep_s_lambda0" / "report.json").read_text())[
        "kld_paper_unguided"]
    assert (out / "sweeps" / "s" / "sweep.png").exists()


def test_two_attributes_four_classes_and_heatmap(celeba, tmp_path):
    root, _, smile_run = celeba
    out = tmp_path / "two"
    run("train.py", "--data", "celeba", "--data-dir", root, "--attr", "Black_Hair/Blond_Hair", "--what",
        "evaluator", "--out", out, *SMALL)
    run("train.py", "--data", "celeba", "--data-dir", root, "--attr", "Smiling,Black_Hair/Blond_Hair", "--out", out,
        *SMALL, *DDPM)
    clf = torch.load(out / "classifier.pt", weights_only=True)
    assert clf["config"]["classifier"]["num_classes"] == 4
    run("sample.py", "--run", out, "--lambdas", "30,30,30,30", "--num-samples", "6", "--sample-steps", "2", "--name", "g",
        "--evaluator", smile_run / "evaluator_Smiling.pt", "--evaluator", out / "evaluator_Black_Hair_Blond_Hair.pt")
    assert (out / "samples" / "g" / "heatmap_2d.png").exists()
    # the histogram numbers are those of the first evaluator (Smiling) on the written samples
    report = json.loads((out / "samples" / "g" / "report.json").read_text())
    samples = np.load(out / "samples" / "g" / "samples.npz")["arr_0"]
    assert samples.shape == (6, 32, 32, 3) and report["lambdas"] == "[[30.0, 30.0, 30.0, 30.0]]"
    expected = recomputed_scores(samples, smile_run / "evaluator_Smiling.pt")
    assert report["mild_049_051"] == expected.pop("mild_049_051")
    for key, value in expected.items():
        assert report[f"{key}_classifier30-30-30-30"] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_log_count_heatmap_bins():
    from evaluate import log_count_heatmap
    m = log_count_heatmap([0.0, 0.01, 1.0, 0.5], [0.0, 0.02, 1.0, 0.97])
    assert m[0, 0] == pytest.approx(np.log(2)) and m[19, 19] == 0 + np.log(1) and m[19, 10] == 0
    assert (m > 0).sum() == 1            # ln(1) = 0: single counts are indistinguishable from empty, as Fig. 9
