"""What each experiment's networks train on, measured on tiny runs of train.py's real code paths (train.main in this
process, 16 px, widths 8): formula tests cannot see a layer that never trains or a label that a flip contradicts.

  a) every trainable parameter of every network trains, late in a short run, with sane Adam moments;
  b) labels follow the augmentations: the attribute a label names, measured on the drawn batches, agrees with it;
  c) the guidance classifier sees x_t of the DDPM's own chain at t ~ U{0..T-1}; the clean classifiers see clean images;
  d) the subsets the recipe prescribes: tests/test_pipeline_subsets.py.

Tools (capture, AdamWatch, match, the pixel measures): tests/pipeline_tools.py. Everything runs in fp32: `--no-amp`,
and the loss functions called here directly are called outside autocast. "paper_notes §N" is docs/paper_notes.md.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from infra import checkpoint as ckpt_io
from data import load_image_folder
from beyond.mnist import read_idx
from beyond.morpho import stroke_thickness
from pipeline_tools import (LATE, STEPS, TINY, AdamWatch, alphas_cumprod, assert_every_parameter_trains, capture,
                            celeba_with_evaluator, chi2_bound, digits_data, disc_centre_x, disc_radius, draw,
                            hair_dark_share, match, mirrored, recorded_models, to_u8, train_main,
                            watched_clean_classifier)
from test_mnist import write_mnist_folder


# ---------------------------------------------------------------------------------------------------
# (a) every parameter trains
# ---------------------------------------------------------------------------------------------------

DDPM_VARIANTS = {
    "unet": [],
    "unet_cfg": ["--cfg-dropout", "0.2"],
    "dit": ["--arch", "dit", "--dit-hidden", "32", "--dit-depth", "2", "--dit-patch", "4", "--dit-heads", "2"],
}
CLASSIFIER_VARIANTS = {
    "plain": ["--no-mirror-equivariant"],
    "mirror_equivariant": ["--mirror-equivariant"],
    "spectral_norm": ["--no-mirror-equivariant", "--spectral-norm"],
}


@pytest.mark.parametrize("variant", DDPM_VARIANTS)
def test_every_ddpm_parameter_trains(variant, tmp_path):
    """The denoiser of [ZSI] App. C (U-Net), its class-conditional form for classifier-free guidance [ZSI App. J]
    and the DiT [ZSI App. J], trained by train.py with AdamW: each parameter tensor keeps moving late in the run
    (RMS change over steps 40-60 > 0.3 lr: an Adam step moves by about lr, so a frozen tensor moves ~0), its
    late gradients are not negligible (> 1e-4 of the median tensor's), its Adam moments are finite, and Adam's
    second moment v̂, about the mean g² of the run's steps, is < 1000x the median step's g²: one gradient blown up,
    as by the old spectral norm's L/eps factor on zero-initialised layers, makes it ~1e15x and freezes the tensor.
    The last 20 of 60 steps, not the last 30: the momentum of one huge first step still moves a frozen tensor
    Σ_k 0.1·0.9^k·√k ≈ 0.26 lr over steps 30-60 but only ≈ 0.1 lr over steps 40-60."""
    with AdamWatch(LATE) as watch, recorded_models() as models:
        train_main("--data", "circles", *TINY, "--what", "ddpm", "--steps", STEPS, "--batch-size", 8,
                   *DDPM_VARIANTS[variant], "--out", tmp_path / "run")
    (run,), (model,) = watch.runs, models
    assert_every_parameter_trains(run, model)


@pytest.mark.parametrize("variant", CLASSIFIER_VARIANTS)
def test_every_guidance_classifier_parameter_trains(variant, tmp_path):
    """The noisy guidance classifier [ZSI Sec. 4.2, 5.5]: plain, the CPU preset's mirror-equivariant head
    (cpu_preset.MirrorEquivariant, not in the paper) and with spectral normalisation [ZSI Sec. 5.5] (the zero-
    initialised last conv of each ResBlock included: the old W·L/σ̂ with σ̂ clamped at eps froze all of them).
    Checks as test_every_ddpm_parameter_trains. The mirror-equivariant head has one dead parameter: its logits are
    g(x) + swap(g(flip x)), so the output bias b enters as b + swap(b) = (b0 + b1)(1, 1), which softmax ignores;
    its gradient is checked to be zero up to round-off."""
    with AdamWatch(LATE) as watch, recorded_models() as models:
        train_main("--data", "circles", *TINY, "--what", "classifier", "--classifier-steps", STEPS,
                   "--classifier-batch-size", 16, *CLASSIFIER_VARIANTS[variant], "--out", tmp_path / "run")
    (run,), (model,) = watch.runs, models
    dead = ("classifier.pool.c_proj.bias",) if variant == "mirror_equivariant" else ()
    assert_every_parameter_trains(run, model, dead)


# ---------------------------------------------------------------------------------------------------
# The clean classifiers: CelebA's evaluation classifier and MNIST's digit classifier, trained once
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    """A miniature CelebA and its Smiling evaluation classifier trained STEPS steps by `train.py --what evaluator`,
    watched (Smiling: at 16 px not learnt to a vanishing loss in 60 steps, as hair colour is, so its late gradients
    are those of training)."""
    with watched_clean_classifier() as rec:
        run = celeba_with_evaluator(tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("celeba") / "eval", STEPS)
    return dict(run, rec=rec)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A miniature MNIST release (tests/test_mnist.py: 40 + 10 stroke digits of width 1-5 px) and the digit
    classifier trained STEPS steps by `train.py --data mnist --what evaluator`, watched."""
    root = tmp_path_factory.mktemp("mnist")
    write_mnist_folder(root / "data")
    with watched_clean_classifier() as rec:
        train_main("--data", "mnist", "--data-dir", root / "data", *TINY, "--image-size", 32, "--what", "evaluator",
                   "--eval-steps", STEPS, "--out", root / "run")
    return dict(root=root, rec=rec)


def test_every_evaluation_classifier_parameter_trains(celeba):
    """The clean evaluation classifier of [ZSI] Sec. 5 (evaluator.EvalNet, standing in for EfficientNetV2-S),
    trained by `train.py --what evaluator`: every parameter trains (checks of test_every_ddpm_parameter_trains)."""
    rec = celeba["rec"]
    (run,), (model,) = rec["watch"].runs, rec["models"]
    assert_every_parameter_trains(run, model)


def test_every_digit_classifier_parameter_trains(digits):
    """MNIST's digit classifier (mnist_eval; not in the paper) that judges the samples: every parameter trains."""
    rec = digits["rec"]
    (run,), (model,) = rec["watch"].runs, rec["models"]
    assert_every_parameter_trains(run, model)


# ---------------------------------------------------------------------------------------------------
# (b) labels follow the augmentations
# ---------------------------------------------------------------------------------------------------

def test_circles_class_conditional_ddpm_labels_name_the_discs_side(tmp_path):
    """[ZSI App. J] classifier-free guidance: the U-Net learns p(x | y) with y = 1{disc centre x >= W/2} [ZSI
    Sec. 5.5], and the DDPM loader h-flips (official code, paper_notes §10, §16.14): a flip moves the disc to the
    other border, so the label must swap. Measured on 40 drawn batches: images are mirrored about half the time
    (a mark pixel shows which), and the disc centroid's side equals the label, mirrored or not. The U-Net's label
    input is the batch label, or the null label K = 2 with probability --cfg-dropout, never another class."""
    calls = capture("--data", "circles", *TINY, "--what", "ddpm", "--cfg-dropout", "0.25", "--batch-size", 64,
                    "--out", tmp_path / "run", mark=True)
    ddpm = calls["ddpm"]
    x, y = draw(ddpm["batches"], 40)
    flipped = mirrored(x)
    assert 0.4 < float(flipped.float().mean()) < 0.6                       # official: random h-flip, p = 1/2
    side = (disc_centre_x(x) >= x.shape[-1] / 2).long()
    wrong = side != y
    assert not wrong.any(), f"{int(wrong[flipped].sum())} mirrored and {int(wrong[~flipped].sum())} other " \
                            f"images of {len(y)} have their disc on the other side than the label"
    assert ddpm["model"].num_classes == 3                                 # K = 2 classes + the null label
    seen, labels = [], []

    def spy(x_t, t, y=None):
        seen.append(y.clone())
        return torch.zeros(x_t.shape[0], 6, *x_t.shape[2:])

    gen = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", enabled=False):
        for _ in range(100):
            xb, yb = next(ddpm["batches"])
            labels.append(yb)
            ddpm["loss_fn"](spy, xb, yb, gen)
    given, labels = torch.cat(seen), torch.cat(labels)
    null = given == 2
    assert torch.equal(given[~null], labels[~null])
    n, p = len(given), 0.25
    assert abs(float(null.float().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("augment", ["none", "flip", "mirror", "flip_dimmed"])
def test_circles_guidance_classifier_labels_name_the_discs_side(augment, tmp_path):
    """The guidance classifier's label is the disc's side, 1{x >= W/2} [ZSI Sec. 5.5], under each
    --classifier-augment: none (the official circles classifier: no flip, paper_notes §10), flip and mirror
    (h-flips, the label swapping with the side), flip with --classifier-intensity 0.5 (dimmed discs keep their
    side). Measured on 40 drawn batches by the bright pixels' centroid; a mark pixel shows which were mirrored."""
    flags = ["--classifier-augment", augment.split("_")[0]] + (["--classifier-intensity", "0.5"]
                                                              if augment.endswith("dimmed") else [])
    calls = capture("--data", "circles", *TINY, "--what", "classifier", *flags, "--out", tmp_path / "run", mark=True)
    x, y = draw(calls["classifier"]["batches"], 40)
    flipped = mirrored(x)
    if augment == "none":
        assert not flipped.any()
    else:
        assert 0.4 < float(flipped.float().mean()) < 0.6
    side = (disc_centre_x(x) >= x.shape[-1] / 2).long()
    wrong = side != y
    assert not wrong.any(), f"{int(wrong[flipped].sum())} mirrored and {int(wrong[~flipped].sum())} other " \
                            f"images of {len(y)} have their disc on the other side than the label"
    assert set(y.tolist()) == {0, 1}


def test_sizes_labels_name_the_disc_size_under_flips(tmp_path):
    """[ZSI App. K] object sizes: label 1 = a large disc. The DDPM's flips and the classifier's (with
    --classifier-augment flip) keep a disc's size, so they keep the label. Measured: radius from the bright area;
    a mark pixel shows that about half the images are mirrored."""
    calls = capture("--data", "sizes", *TINY, "--what", "all", "--classifier-augment", "flip", "--out",
                    tmp_path / "run", mark=True)
    config = ckpt_io.read_config(tmp_path / "run" / "config.json")["data"]
    for kind in ("ddpm", "classifier"):
        x, y = draw(calls[kind]["batches"], 10)
        assert 0.3 < float(mirrored(x).float().mean()) < 0.7, kind
        large = (disc_radius(x) > (config["r_min"] + config["r_max"]) / 2).long()
        assert torch.equal(large, y), kind


def test_celeba_flips_keep_the_label(celeba, tmp_path):
    """CelebA attributes survive a mirror image: the DDPM loader h-flips [official code; paper_notes §2.2] and the
    guidance classifier zoom-crops and h-flips [paper_notes §3.2], labels kept. Label Black_Hair (hair pair, App.
    D.2), measured by the share of near-black pixels. The DDPM's batches are each a train image or its mirror image
    (both occur), labelled as the tree drew that image."""
    calls = capture("--data", "celeba", "--data-dir", celeba["root"], "--attr", "Black_Hair/Blond_Hair", *TINY,
                    "--what", "all", "--out", tmp_path / "run")
    x, y = draw(calls["ddpm"]["batches"], 4)
    found = match(x, celeba["images"])
    assert {m for _, m, _ in found} == {False, True}                          # flipped and unflipped
    np.testing.assert_array_equal(y.numpy(), celeba["black"][[i for i, _, _ in found]].astype(int))
    for kind in ("ddpm", "classifier"):
        x, y = draw(calls[kind]["batches"], 6)
        dark = hair_dark_share(x)       # measured on 3,200 draws: blond 0 always, black >= 0.03 (zoomed in: >= 0.1)
        assert torch.equal((dark > 0.015).long(), y), (kind, dark[(dark > 0.015).long() != y])
        assert ((dark > 0.025) | (dark < 0.005)).all(), kind              # the measure is clear-cut


def test_folder_flips_keep_the_label(tmp_path):
    """Image folders (App. E green lips, App. L hen / jay as folders): a class survives a mirror image; the DDPM
    h-flips and the guidance classifier zoom-crops and h-flips [paper_notes §3.2], labels kept. Files 0_k.png hold
    a small square, 1_k.png a large one, off-centre (a mirror image is no other file): the label is measured by
    the bright mass."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(12):
        for label, side in ((0, 2), (1, 6)):
            img = np.zeros((16, 16, 3), dtype=np.uint8)
            top, left = rng.integers(5, 10 - side // 2, 2)
            img[top:top + side, left:left + side] = 255
            img[2, 2] = 255                                                  # no image is its own mirror
            Image.fromarray(img).save(folder / f"{label}_{k}.png")
    calls = capture("--data", "folder", "--data-dir", folder, *TINY, "--what", "all", "--out", tmp_path / "run")
    images, labels, _ = load_image_folder(folder, 16)
    x, y = draw(calls["ddpm"]["batches"], 2)
    found = match(x, images)
    assert {m for _, m, _ in found} == {False, True}
    np.testing.assert_array_equal(y.numpy(), labels[[i for i, _, _ in found]])
    for kind in ("ddpm", "classifier"):
        x, y = draw(calls[kind]["batches"], 6)
        mass = ((x + 1) / 2).mean(1).sum((1, 2))
        assert torch.equal((mass > 15).long(), y), kind


def test_mnist_labels_name_the_stroke_thickness(digits, tmp_path):
    """MNIST (not in the paper; beyond/mnist.py): the DDPM and the guidance classifier see the δ thinnest (label 0) and δ
    thickest (label 1) digits, never flipped (a mirrored digit is no digit): each drawn image is a pool digit as
    stored, its measured thickness (beyond/morpho.py) on the label's side of the split. The digit classifier's labels are
    the digits 0-9, from digits of every thickness, unflipped."""
    root = digits["root"]
    padded, t, k, thin, thick = digits_data(root, 0.2)
    # one --what at a time: --what all would also train the digit classifier (1,000 steps)
    calls = {kind: capture("--data", "mnist", "--data-dir", root / "data", *TINY, "--image-size", 32, "--what", kind,
                           "--out", tmp_path / kind)[kind] for kind in ("ddpm", "classifier")}
    for kind in ("ddpm", "classifier"):
        x, y = draw(calls[kind]["batches"], 10)
        found = match(x, padded)
        assert not any(m for _, m, _ in found), kind                          # never mirrored
        tx = stroke_thickness(to_u8(x))
        np.testing.assert_array_equal(tx, t[[i for i, _, _ in found]])
        assert (tx[y.numpy() == 0] <= thin).all() and (tx[y.numpy() == 1] >= thick).all(), kind
    rec = digits["rec"]
    assert rec["flips"] == [None]
    digit_labels = read_idx(root / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte")
    x = torch.cat([d[0] for d in rec["draws"]])
    y = torch.cat([d[1] for d in rec["draws"]])
    found = match(x, padded)
    assert not any(m for _, m, _ in found)
    assert all(label in digit_labels[same] for label, (_, _, same) in zip(y.tolist(), found))  # (duplicate images)
    middle = (t > thin) & (t < thick)
    drawn = {i for _, _, same in found for i in same}
    assert middle.any() and set(np.flatnonzero(middle)) <= drawn                # every thickness, middle too


# ---------------------------------------------------------------------------------------------------
# (c) what the classifiers see
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chain", [("cosine", 4000), ("linear", 100)])
def test_guidance_classifier_sees_x_t_of_the_ddpms_chain(chain, tmp_path):
    """[ZSI Sec. 4.2] and the official classifier_train.py (paper_notes §3.2, §16.6): the guidance classifier is
    trained on x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε of the same chain as the DDPM (schedule and T of the run),
    t ~ U{0..T-1}, the raw integer t as its input. Checked on 100 calls of each loss that train.py builds (spy
    networks record their inputs): t's histogram against uniform (chi-square), t within 0..T-1 (for T = 100 every
    value drawn); ε recovered from x_t with the closed-form ᾱ_t is N(0, 1), independent of x_0, per image."""
    schedule, T = chain
    calls = capture("--data", "circles", *TINY, "--what", "all", "--noise-schedule", schedule, "--diffusion-steps", T,
                    "--sample-steps", 4, "--classifier-batch-size", 64, "--batch-size", 64, "--out", tmp_path / "run")
    abar = alphas_cumprod(schedule, T)
    _, diffusion = ckpt_io.build_ddpm(ckpt_io.read_config(tmp_path / "run" / "config.json"))
    np.testing.assert_allclose(diffusion.alphas_cumprod, abar, rtol=1e-12)    # the run's DDPM chain
    for kind in ("classifier", "ddpm"):
        seen = []

        def spy(x_t, t, y=None):
            seen.append((x_t.detach().clone(), t.clone()))
            shape = (x_t.shape[0], 2) if kind == "classifier" else (x_t.shape[0], 6, *x_t.shape[2:])
            return torch.zeros(shape)

        gen, x0s = torch.Generator().manual_seed(1), []
        with torch.autocast("cpu", enabled=False):
            for _ in range(100):
                x, y = next(calls[kind]["batches"])
                x0s.append(x)
                calls[kind]["loss_fn"](spy, x, y, gen)
        x0 = torch.cat(x0s).double()
        x_t = torch.cat([s[0] for s in seen]).double()
        t = torch.cat([s[1] for s in seen])
        assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= T - 1, kind
        bins = 40 if T > 400 else T
        counts = torch.bincount(t * bins // T, minlength=bins).double()
        expected = len(t) / bins
        assert float(((counts - expected) ** 2 / expected).sum()) < chi2_bound(bins - 1), kind
        if T <= 400:
            assert (counts > 0).all(), kind                                   # 0 and T-1 drawn too
        a = torch.from_numpy(abar)[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        n = eps.numel()
        assert abs(float(eps.mean())) < 5 / math.sqrt(n) and abs(float(eps.var()) - 1) < 5 * math.sqrt(2 / n), kind
        std = eps.flatten(1).std(1)
        assert ((std - 1).abs() < 0.25).all(), (kind, std.min(), std.max())   # 768 pixels: SE 0.026
        xc = x0 - x0.mean()
        slope = float((eps * xc).sum() / (xc * xc).sum())
        assert abs(slope) < 5 / math.sqrt(float((xc * xc).sum())), kind        # no x_0 left in ε


def test_clean_classifiers_see_clean_images(celeba, digits):
    """The evaluation classifier [ZSI Sec. 5; paper_notes §5.1: flips only] and the digit classifier are
    classifiers of clean images: in training, each call gets exactly a batch drawn by Batches and nothing else (no
    timestep), and those batches hold train images as stored (CelebA: or mirrored, both occurring; digits: never
    mirrored), no noise."""
    padded = digits_data(digits["root"], 0.2)[0]
    for rec, images, flips in ((celeba["rec"], celeba["images"], {False, True}), (digits["rec"], padded, {False})):
        inputs, draws = rec["inputs"], rec["draws"]
        assert len(inputs) == len(draws) == STEPS
        for (x_in, others), (x, _) in zip(inputs, draws):
            assert torch.equal(x_in, x) and others == ()
        found = match(torch.cat([d[0] for d in draws[:4]]), images)
        assert {m for _, m, _ in found} == flips
    assert celeba["rec"]["flips"] == ["keep"] and digits["rec"]["flips"] == [None]
