"""(d) of tests/test_pipelines.py: the training sets each experiment's recipe prescribes, measured on what train.py's
paths train on (tiny runs, 16 px): circles on the two borders, object sizes at both ends, MNIST's 20 / 60 / 20 split,
App. D's top-k extreme subsets (nested sizes, Young's k per class with the old doubled), App. F's four classes.
Rules are asserted, not outputs: the k most extreme per class, the intersection, the labels from the data's own
draw. Tools: tests/pipeline_tools.py; "paper_notes §N" is docs/paper_notes.md.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from infra import checkpoint as ckpt_io
from beyond.morpho import stroke_thickness
from pipeline_tools import (TINY, assert_top_k, capture, celeba_with_evaluator, digits_data, evaluator_p1, match,
                            read_positions, train_main)
from test_mnist import write_mnist_folder


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    """A miniature CelebA and its Smiling evaluation classifier (60 steps: it ranks by the smile, val. acc. ~0.9)."""
    return celeba_with_evaluator(tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("celeba") / "eval", 60)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A miniature MNIST release (tests/test_mnist.py: 40 + 10 stroke digits of width 1-5 px)."""
    root = tmp_path_factory.mktemp("mnist")
    write_mnist_folder(root / "data")
    return dict(root=root)


@pytest.mark.parametrize("delta", [0.2, 0.3])
def test_circles_train_on_the_two_borders_every_position_once(delta, tmp_path):
    """[ZSI Sec. 5.5], official borders_circles.py (paper_notes §10): discs of radius 2 centred at x <
    int(δW) or x >= W - int(δW) (x/W in [0, δ] ∪ [1 - δ, 1]), y over the full range r..W-r-1, every (x, y) once;
    label 1 = right. Measured: the centroid of each image of the DDPM's data set."""
    calls = capture("--data", "circles", *TINY, "--delta", delta, "--what", "ddpm", "--out", tmp_path / "run")
    b = calls["ddpm"]["batches"]
    x = b.images.float() / 127.5 - 1
    W, r, border = x.shape[-1], 2, int(delta * x.shape[-1])
    w = (x + 1).sum(1)
    cx = (w.sum(1) * torch.arange(W)).sum(1) / w.sum((1, 2))
    cy = (w.sum(2) * torch.arange(W)).sum(1) / w.sum((1, 2))
    centres = sorted(zip(cx.round().long().tolist(), cy.round().long().tolist()))
    xs = [v for v in range(r, W - r) if v < border or v >= W - border]
    assert centres == sorted((a, c) for a in xs for c in range(r, W - r))
    assert all(a / W <= delta or a / W >= 1 - delta for a, _ in centres)
    assert torch.equal(b.labels, (cx >= W / 2).long()) and int(b.labels.sum()) * 2 == len(b.labels)


def test_sizes_train_on_the_smallest_and_largest_radii(tmp_path):
    """[ZSI App. K]: the extremes are the 20% smallest and the 20% largest sizes: radii r_min..r_max, k =
    round(0.2 · count) at each end; label 1 = large. Measured radius: the bright width of the disc's centre row."""
    calls = capture("--data", "sizes", *TINY, "--image-size", 32, "--what", "ddpm", "--out", tmp_path / "run")
    config = ckpt_io.read_config(tmp_path / "run" / "config.json")["data"]
    b = calls["ddpm"]["batches"]
    bright = b.images.float().mean(1) > 127.5
    radius = (bright.sum(2).max(1).values - 1) // 2
    radii = list(range(config["r_min"], config["r_max"] + 1))
    k = int(round(config["delta"] * len(radii)))
    assert set(radius.tolist()) == set(radii[:k] + radii[-k:])
    assert torch.equal(b.labels, (radius > (config["r_min"] + config["r_max"]) / 2).long())
    assert int(b.labels.sum()) * 2 == len(b.labels)


@pytest.mark.parametrize("delta", [0.2, 0.3])
def test_mnist_trains_on_the_thinnest_and_thickest_delta(digits, delta, tmp_path):
    """MNIST (beyond/mnist.py, README): the DDPM and the guidance classifier see the round(δN) thinnest and round(δN)
    thickest of the N pool digits (δ = 0.2: 20 / 60 / 20), the middle held out. Measured thickness (beyond/morpho.py):
    the training set is exactly the k thinnest and k thickest, labels balanced."""
    padded, t, k, thin, thick = digits_data(digits["root"], delta)
    calls = capture("--data", "mnist", "--data-dir", digits["root"] / "data", *TINY, "--image-size", 32, "--delta",
                    delta, "--what", "ddpm", "--out", tmp_path / "run")
    b = calls["ddpm"]["batches"]
    tx = stroke_thickness(b.images.permute(0, 2, 3, 1).numpy())
    assert len(b) == 2 * k and int(b.labels.sum()) == k
    np.testing.assert_array_equal(np.sort(tx), np.sort(np.concatenate([np.sort(t)[:k], np.sort(t)[-k:]])))
    assert (tx[b.labels.numpy() == 0] <= thin).all() and (tx[b.labels.numpy() == 1] >= thick).all()


@pytest.fixture(scope="module")
def filtered(celeba, tmp_path_factory):
    """`train.py --what filter` runs on the tree (168 train images), k scaled 1/1000 from the paper: the hair sizes
    60, 30, 10 (Table 1's 60k / 30k / 10k), Young's --top-k 7,15 (7,000 / 15,000); App. F's 30k, 30k, 15k, 15k at
    1/500, --top-k 60,60,30,30 (at 1/1000 the intersection on this tree lacks smiling blonds: each evaluator's
    extremes lean on the other attribute). The stage-1 scorer is the evaluation classifier (Young's by default,
    --stage1 evaluator for the others), one ensemble member, τ1 = τ2 = 0.3 so that enough survive a tiny run."""
    base = tmp_path_factory.mktemp("filter")
    common = [*TINY, "--eval-steps", 6, "--members", 1, "--tau1", 0.3, "--tau2", 0.3]
    tree = ["--data", "celeba", "--data-dir", celeba["root"]]
    outs = {}
    for attr in ("Black_Hair/Blond_Hair", "Young"):      # their evaluators: a few steps (they only rank)
        train_main(*tree, "--attr", attr, "--what", "evaluator", "--eval-steps", 10, *TINY, "--out", base / "eval")
    for name, attrs, flags, evaluators in (
            ("hair", "Black_Hair/Blond_Hair", ["--train-size", "60,30,10", "--stage1", "evaluator"],
             ["Black_Hair_Blond_Hair"]),
            ("young", "Young", ["--top-k", "7,15"], ["Young"]),
            ("two", "Smiling,Black_Hair/Blond_Hair", ["--top-k", "60,60,30,30", "--stage1", "evaluator"],
             ["Smiling", "Black_Hair_Blond_Hair"])):
        out = base / name
        out.mkdir()
        for e in evaluators:
            src = celeba["out"] / "evaluator_Smiling.pt" if e == "Smiling" else base / "eval" / f"evaluator_{e}.pt"
            shutil.copy(src, out / src.name)
        train_main(*tree, "--attr", attrs, "--what", "filter", *flags, *common, "--out", out)
        outs[name] = out
    return outs


def test_app_d_keeps_the_k_most_extreme_per_class_nested(celeba, filtered):
    """[ZSI App. D, Sec. 5.2]: survivors of stage 1 (p(y | x) > τ1, here by the evaluation classifier) and of the
    ensemble are ranked by the evaluation classifier's p(class 1); a subset of size n keeps the n/2 lowest of
    label 0 and the n/2 highest of label 1; the sizes are nested (10k ⊂ 30k ⊂ 60k; here 10 ⊂ 30 ⊂ 60). Labels:
    Black_Hair from the tree's own draw."""
    out = filtered["hair"]
    p1 = evaluator_p1(out / "evaluator_Black_Hair_Blond_Hair.pt", celeba["images"])
    labels = celeba["black"].astype(int)
    survivors = read_positions(out / "subset_Black_Hair_Blond_Hair_stage2.txt")
    p_label = np.where(labels == 1, p1, 1 - p1)
    assert (p_label[survivors] > 0.3).all()                                   # stage 1 by the evaluator, τ1
    kept = {}
    for size in (60, 30, 10):
        kept[size] = read_positions(out / f"subset_Black_Hair_Blond_Hair_{size}.txt")
        assert len(kept[size]) == size
        assert_top_k(p1, labels, kept[size], survivors, size // 2, size // 2)
    assert set(kept[10]) <= set(kept[30]) <= set(kept[60])


def test_young_keeps_k_per_class_and_oversamples_the_old(celeba, filtered, tmp_path):
    """[ZSI Sec. 5.4]: the Young set keeps the 7,000 oldest and the 15,000 youngest (here 7 and 15, --top-k 7,15),
    stage 1 by a face model (FaRL; here the evaluation classifier, --stage1 auto), and the DDPM and classifier
    train with the old doubled (official is_rates 0:2, --oversample 0:2): 2·7 old images, each twice, and 15 young."""
    out = filtered["young"]
    positions = read_positions(out / "subset_Young_k7-15.txt")
    labels = celeba["young"].astype(int)
    p1 = evaluator_p1(out / "evaluator_Young.pt", celeba["images"])
    survivors = read_positions(out / "subset_Young_stage2.txt")
    assert (np.where(labels == 1, p1, 1 - p1)[survivors] > 0.3).all()
    assert_top_k(p1, labels, positions, survivors, 7, 15)
    calls = capture("--data", "celeba", "--data-dir", celeba["root"], "--attr", "Young", "--subset",
                    out / "subset_Young_k7-15.txt", "--oversample", "0:2", *TINY, "--what", "all", "--out",
                    tmp_path / "run")
    for kind in ("ddpm", "classifier"):
        b = calls[kind]["batches"]
        assert len(b) == 2 * 7 + 15 and int((b.labels == 0).sum()) == 14, kind
        found = match(b.images.float() / 127.5 - 1, celeba["images"])
        counts = np.bincount([i for i, _, _ in found], minlength=len(labels))
        np.testing.assert_array_equal(counts[positions], np.where(labels[positions] == 0, 2, 1))
        assert counts.sum() == 29


def test_app_f_four_classes_are_the_intersection_labelled_0_to_3(celeba, filtered, tmp_path):
    """[ZSI Sec. 6, App. F]: the two-attribute set is the intersection of the Smiling and hair extreme sets
    (30k + 30k and 15k + 15k; here 60, 60, 30, 30), labels 0 = smiling & black hair, 1 = smiling & blond, 2 = not
    smiling & black, 3 = not smiling & blond (official smile_hair_2d_dataset.py, paper_notes §11); the DDPM and a
    4-class guidance classifier train on it. Labels checked against the tree's own smile (mouth curvature > 0) and
    hair draws; the report's size and class counts against those labels."""
    out = filtered["two"]
    name = "k60-60_k30-30"
    smile = read_positions(out / "subset_Smiling_k60-60.txt")
    hair = read_positions(out / "subset_Black_Hair_Blond_Hair_k30-30.txt")
    both = read_positions(out / f"subset_Smiling-Black_Hair_Blond_Hair_{name}.txt")
    np.testing.assert_array_equal(both, np.intersect1d(smile, hair))
    assert len(smile) == 120 and len(hair) == 60
    expected = 2 * (1 - celeba["smile"].astype(int)) + (1 - celeba["black"].astype(int))
    counts = np.bincount(expected[both], minlength=4)
    assert (counts > 0).all(), counts
    calls = capture("--data", "celeba", "--data-dir", celeba["root"], "--attr", "Smiling,Black_Hair/Blond_Hair",
                    "--subset", out / f"subset_Smiling-Black_Hair_Blond_Hair_{name}.txt", *TINY, "--what", "all",
                    "--out", tmp_path / "run")
    for kind in ("ddpm", "classifier"):
        b = calls[kind]["batches"]
        found = match(b.images.float() / 127.5 - 1, celeba["images"])
        assert sorted(i for i, _, _ in found) == sorted(both.tolist()), kind
        np.testing.assert_array_equal(b.labels.numpy(), expected[[i for i, _, _ in found]])
    logits = calls["classifier"]["model"](torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    assert logits.shape == (1, 4)
    report = json.loads((out / "subset_Smiling-Black_Hair_Blond_Hair_report.json").read_text())
    assert report[f"size_{name}"] == len(both)
    assert [report[f"class{c}_{name}"] for c in range(4)] == counts.tolist()
