"""data.py: the circles generator of EXPERIMENTS.md §10, image folders, batches."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import Batches, DataError, circle_positions, circles_dataset, load_image_folder, render_circles, to_float, to_uint8


def test_circle_support_64_matches_official():
    pos = circle_positions(64)
    assert len(pos) == 1200
    assert sorted(set(pos[:, 0])) == list(range(2, 12)) + list(range(52, 62))
    assert sorted(set(pos[:, 1])) == list(range(2, 62))


def test_circle_support_32_and_full_range():
    pos = circle_positions(32)
    assert sorted(set(pos[:, 0])) == [2, 3, 4, 5, 26, 27, 28, 29] and len(pos) == 224
    assert sorted(set(circle_positions(32, full_range=True)[:, 0])) == list(range(2, 30))


def test_disc_is_21_white_pixels_centred_on_its_position():
    img = render_circles(np.array([[9, 20]]), 32)[0]
    assert set(np.unique(img)) == {0, 255}
    ys, xs = np.nonzero(img[..., 0])
    assert len(xs) == 21 and xs.mean() == 9 and ys.mean() == 20


def test_circles_dataset_labels_and_determinism():
    a, la, pa = circles_dataset(32, seed=1)
    b, lb, pb = circles_dataset(32, seed=1)
    c, _, pc = circles_dataset(32, seed=2)
    assert np.array_equal(a, b) and np.array_equal(pa, pb) and not np.array_equal(pa, pc)
    assert (la == (pa[:, 0] >= 16)).all() and la.mean() == 0.5


def test_image_folder_round_trip(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i % 2}_{i}.png")
    images, labels, classes = load_image_folder(tmp_path)        # files are read in sorted name order
    order = sorted(range(4), key=lambda i: f"{i % 2}_{i}.png")
    assert classes == ["0", "1"] and labels.tolist() == [0, 0, 1, 1]
    assert np.array_equal(images, imgs[order])
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .png"):
        load_image_folder(tmp_path / "empty")


def test_float_uint8_conversion_truncates_like_official():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    back = to_uint8(to_float(u8)).astype(int)
    assert (back <= u8).all() and (u8 - back <= 1).all()                  # float32 round-off, then truncation
    assert to_uint8(torch.full((1, 1, 1, 1), 0.999))[0, 0, 0, 0] == 254   # (x+1)·127.5 = 254.87 -> 254


def test_mirror_batches_swap_labels_consistently():
    images, labels, pos = circles_dataset(32)
    batches = Batches(images, labels, 256, flip=True, flip_labels=True, seed=0)
    x, y = next(batches)
    centre = (x[:, 0] > 0).float().mul(torch.arange(32.0)).sum((1, 2)) / (x[:, 0] > 0).float().sum((1, 2))
    assert ((centre >= 16).long() == y).all()


def test_batch_size_zero_is_refused():
    with pytest.raises(DataError, match="batch size"):
        Batches(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2), 0)


def test_intensity_augmentation_dims_discs_keeps_background_and_labels():
    images, labels, _ = circles_dataset(32)
    plain = Batches(images, labels, 256, seed=3)
    dimmed = Batches(images, labels, 256, seed=3, intensity=0.2)
    (x, y), (xd, yd) = next(plain), next(dimmed)
    assert torch.equal(y, yd)                                       # same images drawn, labels untouched
    assert torch.equal(xd[x == -1], x[x == -1])                     # black background stays black
    scale = (xd.amax((1, 2, 3)) + 1) / 2                            # the white disc's new level, in [0.2, 1]
    assert scale.min() >= 0.2 - 1e-6 and scale.max() <= 1 + 1e-6 and scale.std() > 0.1
    assert torch.allclose(xd, scale.view(-1, 1, 1, 1) * (x + 1) - 1, atol=1e-6)
    assert torch.equal(next(Batches(images, labels, 256, seed=3, intensity=1.0))[0], x)   # 1 = off, same stream
    with pytest.raises(DataError, match="intensity"):
        Batches(images, labels, 4, intensity=1.5)
