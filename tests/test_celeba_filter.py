"""The App. D filter through train.py on a generated CelebA-format tree: k per class (--top-k, the Young set of
[ZSI] Sec. 5.4) with the evaluation classifier as stage 1, the 4-class set of two attributes (App. F) as the
intersection of the single-attribute sets, a DDPM trained on it in another folder, and sample.py finding (or
failing loudly without) the evaluators of that run."""
import json
import shutil

import numpy as np
import pytest
import torch

from celeba_tree import make_celeba_tree
from data import celeba_split, load_images
from appendix.evaluator import load_evaluator, predict_probs
from test_cli import run

SIZE = ["--image-size", "16", "--eval-width", "8", "--eval-steps", "60", "--log-every", "50"]
FILTER = ["--what", "filter", "--tau1", "0.6", "--tau2", "0.6", "--members", "2", "--stage1", "evaluator", *SIZE,
          "--eval-steps", "20"]
HAIR = "Black_Hair/Blond_Hair"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The tree (126 train images), its latents, and a folder with the evaluators of Smiling and of hair."""
    root = tmp_path_factory.mktemp("tree")
    latent = make_celeba_tree(root, n=180, seed=4)
    out = tmp_path_factory.mktemp("filtered")
    for attr in ("Smiling", HAIR):
        run("train.py", "--data", "celeba", "--data-dir", root, "--attr", attr, "--what", "evaluator", "--out", out,
            *SIZE)
    train = latent["split"] == 0
    return root, dict(smile=latent["curvature"][train] > 0, black=latent["black_hair"][train]), out


@pytest.fixture(scope="module")
def singles(tree):
    """Each attribute filtered by its own command (the evaluation classifier as stage 1): Smiling with k = 12
    non-smiling and 30 smiling, hair with 40 per side; returns their index files."""
    root, _, out = tree
    for attr, k in (("Smiling", "12,30"), (HAIR, "40,40")):
        run("train.py", "--data", "celeba", "--data-dir", root, "--attr", attr, "--top-k", k, "--out", out, *FILTER)
    return out / "subset_Smiling_k12-30.txt", out / "subset_Black_Hair_Blond_Hair_k40-40.txt"


def test_top_k_per_class_keeps_the_k0_lowest_and_k1_highest_survivors(tree, singles):
    """Oracle: the evaluator scores the train images here; stage 1 keeps exactly those it gives p(own label) > 0.6,
    and the written set is the 12 lowest-p(smile) non-smiling and 30 highest smiling stage-2 survivors."""
    root, latent, out = tree
    kept = np.loadtxt(singles[0], dtype=int)
    stage2 = np.loadtxt(out / "subset_Smiling_stage2.txt", dtype=int)
    assert len(kept) == 42 and (latent["smile"][kept] == 0).sum() == 12 and latent["smile"][kept].sum() == 30
    paths, labels, _, _, positions = celeba_split(root, ["Smiling"], "train")
    assert positions.tolist() == list(range(len(labels))) and np.array_equal(labels, latent["smile"])
    images = load_images(paths, 16)
    model, _ = load_evaluator(out / "evaluator_Smiling.pt")
    confident = predict_probs(model, images).numpy()[np.arange(len(labels)), labels] > 0.6
    report = json.loads((out / "subset_Smiling_report.json").read_text())
    assert report["stage1"] == "evaluator" and report["stage1_tau1"] == confident.sum()
    assert set(stage2) <= set(np.flatnonzero(confident)) and report["stage2_ensemble_tau2"] == len(stage2)
    p1 = predict_probs(model, images[stage2])[:, 1].numpy()             # the filter's own scoring of the survivors
    low = sorted((i for i in range(len(stage2)) if labels[stage2[i]] == 0), key=lambda i: (p1[i], i))[:12]
    high = sorted((i for i in range(len(stage2)) if labels[stage2[i]] == 1), key=lambda i: (-p1[i], i))[:30]
    assert kept.tolist() == sorted(stage2[low + high].tolist())


def test_top_k_above_the_class_count_fails_in_one_line_before_any_training(tree):
    """126 train images, so no class has 100; the other bad values fail in config.check_run (tests/test_cli.py)."""
    root, latent, out = tree
    before = sorted(p.name for p in out.iterdir())
    proc = run("train.py", "--data", "celeba", "--data-dir", root, "--attr", "Smiling", "--top-k", "100,5", "--out",
               out, *FILTER, ok=False)
    n0, n1 = (latent["smile"] == 0).sum(), latent["smile"].sum()
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (f"--top-k 100,5 asks for more than the train split holds: {n0} of label 0 and {n1} of label 1 for "
            f"Smiling") in proc.stderr
    assert "[evaluator]" not in proc.stdout and sorted(p.name for p in out.iterdir()) == before


@pytest.fixture(scope="module")
def two(tree, tmp_path_factory):
    """The 4-class set written by one two-attribute command, in a folder with copies of the two evaluators."""
    root, _, filtered = tree
    out = tmp_path_factory.mktemp("two")
    for name in ("evaluator_Smiling.pt", "evaluator_Black_Hair_Blond_Hair.pt"):
        shutil.copy(filtered / name, out / name)
    proc = run("train.py", "--data", "celeba", "--data-dir", root, "--attr", f"Smiling,{HAIR}", "--top-k",
               "12,30,40,40", "--out", out, *FILTER)
    return out, proc.stdout


def test_two_attributes_are_the_intersection_of_the_single_attribute_sets(tree, singles, two):
    root, latent, _ = tree
    out, stdout = two
    smile, hair = (np.loadtxt(path, dtype=int) for path in singles)
    both = np.loadtxt(out / "subset_Smiling-Black_Hair_Blond_Hair_k12-30_k40-40.txt", dtype=int)
    assert both.tolist() == sorted(set(smile) & set(hair)) and len(both) > 0
    # the training labels of the file (data.py's two-attribute order) match the tree's latents
    _, labels, _, _, positions = celeba_split(root, ["Smiling", HAIR], "train", out /
                                              "subset_Smiling-Black_Hair_Blond_Hair_k12-30_k40-40.txt")
    s, b = latent["smile"][both], latent["black"][both]
    expected = np.select([s & b, s & ~b, ~s & b], [0, 1, 2], 3)
    assert positions.tolist() == both.tolist() and labels.tolist() == expected.tolist()
    report = json.loads((out / "subset_Smiling-Black_Hair_Blond_Hair_report.json").read_text())
    assert report["size_k12-30_k40-40"] == len(both)
    assert [report[f"class{c}_k12-30_k40-40"] for c in range(4)] == np.bincount(expected, minlength=4).tolist()
    assert report["classes"] == ("0 = Smiling & Black_Hair, 1 = Smiling & Blond_Hair, 2 = not Smiling & Black_Hair, "
                                 "3 = not Smiling & Blond_Hair")
    assert f"{len(both)} images" in stdout


def test_ddpm_on_the_four_class_set_is_scored_by_the_evaluators_next_to_it(tree, two, tmp_path):
    """A DDPM trained in another --out finds the evaluators next to its subset file; without one, sample.py stops
    before sampling, in one line naming --evaluator, and writes nothing."""
    root, _, _ = tree
    out, _ = two
    subset = out / "subset_Smiling-Black_Hair_Blond_Hair_k12-30_k40-40.txt"
    ddpm = tmp_path / "2d"
    run("train.py", "--data", "celeba", "--data-dir", root, "--attr", f"Smiling,{HAIR}", "--subset", subset,
        "--out", ddpm, "--image-size", "16", "--model-channels", "8", "--classifier-width", "8", "--steps", "2",
        "--classifier-steps", "2", "--sample-steps", "2", "--eval-samples", "2", "--log-every", "1")
    assert torch.load(ddpm / "classifier.pt", weights_only=True)["config"]["classifier"]["num_classes"] == 4
    assert json.loads((ddpm / "config.json").read_text())["data"]["subset"] == str(subset)
    hair = out / "evaluator_Black_Hair_Blond_Hair.pt"
    hair.rename(out / "away.pt")
    try:
        proc = run("sample.py", "--run", ddpm, "--lambdas", "30,30,30,30", "--num-samples", "2", ok=False)
    finally:
        (out / "away.pt").rename(hair)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pass --evaluator PATH" in proc.stderr and "evaluator_Black_Hair_Blond_Hair.pt" in proc.stderr
    assert not (ddpm / "samples").exists() and "[sample]" not in proc.stdout
    run("sample.py", "--run", ddpm, "--lambdas", "30,30,30,30", "--num-samples", "2", "--name", "g")
    report = json.loads((ddpm / "samples" / "g" / "report.json").read_text())
    assert report["evaluators"] == f"{out / 'evaluator_Smiling.pt'}, {hair}"
    assert report["kld_paper_classifier30-30-30-30"] >= 0 and (ddpm / "samples" / "g" / "heatmap_2d.png").exists()
