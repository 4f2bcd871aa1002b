"""Sec. 7 (--data quadrant) and App. E (--data green) on circles: what each network trains on, measured on the pixels
(disc centroid, disc colour), the reports on hand-made images, and each experiment end to end on a tiny run."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from appendix.extrapolation import disc_colours, green_metrics, quadrant_metrics
from data import GREEN, green_pairs, load_data, quadrant_dataset, render_circles

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_tools import TINY, capture, draw, to_u8  # noqa: E402
from test_cli import run  # noqa: E402

W = 32


def centres(images):
    """(x, y) pixel centroid of the bright pixels of each one-disc image [N, 2]: the attribute, measured."""
    bright = np.asarray(images).max(axis=-1) > 127
    ys, xs = np.indices(bright.shape[1:])
    n = bright.sum((1, 2))
    assert (n > 0).all()
    return np.stack([(bright * xs).sum((1, 2)) / n, (bright * ys).sum((1, 2)) / n], 1)


def painted(rgb, centre=(8, 8), size=W):
    """One disc of radius 2 in colour rgb on black, uint8 [H, W, 3]."""
    img = Image.new("RGB", (size, size))
    x, y = centre
    ImageDraw.Draw(img).ellipse([x - 2, y - 2, x + 2, y + 2], fill=tuple(rgb))
    return np.asarray(img)


# ----- the data sets -----

def test_quadrant_ddpm_sees_one_quadrant_and_the_classifier_all_four_labelled_by_the_half():
    """Radius 2 at 32 px: centres 2..29 on each axis (28 values), 14 of them below W/2: 196 DDPM images, 784
    classifier images, half of them right of W/2."""
    config = dict(name="quadrant", image_size=W, radius=2, seed=42)
    images, labels = load_data(config)
    c = centres(images)
    assert len(images) == 14 * 14 and (c < W / 2).all() and (labels == 0).all()
    images, labels = load_data(config, "classifier")
    c = centres(images)
    assert len(images) == 28 * 28 and (labels == (c[:, 0] >= W / 2)).all() and labels.sum() == 28 * 14
    assert ((c[:, 1] >= W / 2) & (c[:, 0] < W / 2)).sum() == 14 * 14                 # every quadrant is there


def test_green_pairs_are_the_same_discs_white_and_green():
    config = dict(name="green", image_size=W, radius=2, delta=0.2, seed=42)
    white, _ = load_data(config)
    images, labels = load_data(config, "classifier")
    assert len(images) == 2 * len(white) and labels.tolist() == [0] * len(white) + [1] * len(white)
    assert (white.max(-1) == white.min(-1)).all()                                   # the DDPM: no colour at all
    np.testing.assert_array_equal(images[labels == 0], white)
    disc = white.max(-1) > 0
    np.testing.assert_array_equal(images[labels == 1][disc], np.broadcast_to(GREEN, (int(disc.sum()), 3)))
    assert (images[labels == 1][~disc] == 0).all()
    assert green_metrics(images[labels == 1])["green"] == 1 and green_metrics(white)["white"] == 1


# ----- the reports on hand-made images -----

def test_quadrant_metrics_count_hand_placed_discs():
    """Six images: a disc in each quadrant, two discs, none. Shares of all six, by hand."""
    images = render_circles([np.array([[5, 5]]), np.array([[20, 5]]), np.array([[5, 20]]), np.array([[20, 20]]),
                             np.array([[5, 5], [20, 20]]), np.zeros((0, 2))], W)
    m = quadrant_metrics(images)
    assert (m["one_disc"], m["in_training_quadrant"], m["beyond_support"]) == (4 / 6, 1 / 6, 3 / 6)
    assert (m["right_half"], m["lower_half"], m["broken"]) == (2 / 6, 2 / 6, 2 / 6)
    np.testing.assert_allclose(np.sort(m["x"]), np.array([5, 5, 20, 20]) / W)


def test_green_metrics_read_hue_and_saturation_of_hand_painted_discs():
    """White, pure green, pale green ((127, 255, 127): saturation 0.502, just over the threshold), red, dark green
    (0, 150, 0: grey level 88, found by its brightest channel), grey (128: brightest channel above 127, no colour),
    and an empty image."""
    colours = [(255, 255, 255), GREEN, (127, 255, 127), (255, 0, 0), (0, 150, 0), (128, 128, 128)]
    images = np.stack([painted(c) for c in colours] + [np.zeros((W, W, 3), np.uint8)])
    found = disc_colours(images)
    assert [n for n, _ in found] == [1] * 6 + [0]
    np.testing.assert_allclose(found[1][1], GREEN)
    m = green_metrics(images)
    assert m["green"] == 3 / 7 and m["white"] == 2 / 7 and m["broken"] == 1 / 7 and m["one_disc"] == 6 / 7
    np.testing.assert_allclose(m["greenness"], np.array([0, 255, 128, -255, 150, 0]) / 255)


# ----- what each network trains on -----

def test_quadrant_run_trains_the_ddpm_on_one_quadrant_unflipped_and_the_classifier_on_all_four(tmp_path):
    """train.py --data quadrant: every DDPM batch image has its disc in the top-left quadrant (a flip would move it
    out: none); the classifier's labels are the measured half of the disc, and it sees every quadrant."""
    calls = capture("--data", "quadrant", *TINY, "--image-size", W, "--what", "all", "--out", tmp_path / "run")
    x, _ = draw(calls["ddpm"]["batches"], 20)
    assert (centres(to_u8(x)) < W / 2).all()
    x, y = draw(calls["classifier"]["batches"], 20)
    c = centres(to_u8(x))
    assert torch.equal(y, torch.as_tensor(c[:, 0] >= W / 2).long()) and (c[:, 1] >= W / 2).any()


def test_green_run_trains_the_ddpm_on_white_discs_and_the_classifier_on_the_colour(tmp_path):
    calls = capture("--data", "green", *TINY, "--image-size", W, "--what", "all", "--out", tmp_path / "run")
    x, _ = draw(calls["ddpm"]["batches"], 20)
    assert (x.amax(1) == x.amin(1)).all()                                          # grey levels only
    x, y = draw(calls["classifier"]["batches"], 20)
    colour = np.array([c for _, c in disc_colours(to_u8(x))])
    assert torch.equal(y, torch.as_tensor(colour[:, 0] < 128).long()) and 0 < int(y.sum()) < len(y)


# ----- end to end, tiny -----

def test_each_experiment_runs_and_reports(tmp_path):
    flags = ["--image-size", "16", "--model-channels", "8", "--classifier-width", "8", "--steps", "2",
             "--classifier-steps", "2", "--eval-samples", "0", "--sample-steps", "2", "--no-overlap"]
    for data, keys in (("quadrant", {"beyond_support", "right_half", "in_training_quadrant", "broken"}),
                       ("green", {"green_disc", "white_disc", "median_greenness", "broken"})):
        out = tmp_path / data
        run("train.py", "--data", data, *flags, "--out", out)
        run("sample.py", "--run", out, "--lambdas", "0,30", "--num-samples", "3", "--name", "g")
        report = json.loads((out / "samples" / "g" / "report.json").read_text())
        assert keys <= set(report) and 0 <= report["broken"] <= 1, data
        pictures = ("histogram_x.png", "histogram_y.png", "heatmap_centres.png") if data == "quadrant" else \
            ("histogram_greenness.png",)
        assert all((out / "samples" / "g" / p).stat().st_size > 0 for p in pictures)
