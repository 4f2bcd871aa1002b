"""The guidance classifier's zoom-and-crop augmentation (data.resized_crop / random_resized_crop): the official CelebA
classifiers' random crop of zoom 1-1.25 (guided-diffusion's random_crop_arr), on for celeba and folders, off for
circles, checked against F.interpolate and against a per-pixel computation by hand."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from appendix import augment
import config
from appendix.augment import parse_crop_scale, random_resized_crop, resized_crop
from celeba_tree import make_celeba_tree
from cli import InputError
from data import Batches
from test_cli import TINY

# Keys' cubic convolution kernel W(d) with a = -0.75 (torch's bicubic): W(d) = (a+2)|d|³ - (a+3)|d|² + 1 for |d| <= 1,
# a|d|³ - 5a|d|² + 8a|d| - 4a for 1 < |d| < 2. A zoom by 2 samples the input at u/2 - 1/4 (u: upscaled pixel), so
# every output pixel sits a quarter pixel off an input pixel: W(1.75), W(0.75), W(0.25), W(1.25) for even u (taps
# k-2..k+1 with u = 2k) and the mirror order for odd u (taps k-1..k+2 with u = 2k+1). Exact binary fractions.
EVEN = [-0.03515625, 0.26171875, 0.87890625, -0.10546875]
ODD = EVEN[::-1]


def zoom2_by_hand(row, offset, side):
    """One row zoomed by 2 and cropped at `offset`, pixel by pixel, taps beyond the edges repeating the edge pixel."""
    out = []
    for j in range(side):
        u = offset + j
        weights, first = (EVEN, u // 2 - 2) if u % 2 == 0 else (ODD, u // 2 - 1)
        taps = [row[min(max(first + i, 0), len(row) - 1)] for i in range(4)]
        out.append(sum(w * v for w, v in zip(weights, taps)))
    return out


def test_kernel_weights_by_hand_sum_to_one():
    a = -0.75
    w = lambda d: (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1 if d <= 1 else a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    assert [w(d) for d in (1.75, 0.75, 0.25, 1.25)] == EVEN and sum(EVEN) == 1.0


def test_zoom_by_two_equals_the_per_pixel_computation():
    """A known pattern (a bar and a ramp along x, constant along y), zoomed by 2 and cropped at chosen offsets."""
    side = 8
    row = [0.0, 0.0, 0.5, 0.5, -0.25, 0.1, 0.2, 0.3]
    x = torch.tensor(row, dtype=torch.float64).expand(2, 3, side, side).clone()
    offsets = torch.tensor([[3, 0], [5, 8]])              # (top, left): left edge, and right edge (16 - 8)
    out = resized_crop(x, torch.tensor([16, 16]), offsets)
    for i, left in enumerate((0, 8)):
        want = torch.tensor(zoom2_by_hand(row, left, side), dtype=torch.float64)
        torch.testing.assert_close(out[i], want.expand(3, side, side), rtol=0, atol=1e-12)


def test_any_zoom_equals_interpolate_then_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    sizes, offsets = torch.tensor([17, 20, 32, 19]), torch.tensor([[1, 0], [2, 3], [16, 5], [0, 3]])
    out = resized_crop(x, sizes, offsets)
    for i, (s, (top, left)) in enumerate(zip(sizes.tolist(), offsets.tolist())):
        want = F.interpolate(x[i:i + 1], size=s, mode="bicubic", align_corners=False)
        torch.testing.assert_close(out[i], want[0, :, top:top + 16, left:left + 16].clamp(-1, 1), rtol=0, atol=1e-5)
    assert out.min() >= -1 and out.max() <= 1                    # clipped, as the official uint8 image is


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_kept_and_zoom_one_is_the_identity(dtype):
    x = torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=dtype) * 2 - 1
    out = random_resized_crop(x, (1.0, 1.25), torch.Generator().manual_seed(2))
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(random_resized_crop(x, (1.0, 1.0), torch.Generator().manual_seed(2)), x)
    assert torch.equal(resized_crop(x, torch.full((5,), 12), torch.zeros(5, 2, dtype=torch.long)), x)
    with pytest.raises(ValueError, match="square"):
        resized_crop(x[..., :10], torch.full((5,), 12), torch.zeros(5, 2, dtype=torch.long))


def test_draws_are_the_official_integer_sides_and_offsets(monkeypatch):
    """L = 64, (1, 1.25): S ~ U{64..80} (guided-diffusion: short side in [ceil(64/1), ceil(64/0.8)]), offsets
    U{0..S-64} each; the same generator state gives the same draws."""
    seen = []
    monkeypatch.setattr(augment, "resized_crop", lambda x, sizes, offsets: seen.append((sizes, offsets)) or x)
    x = torch.zeros(4000, 1, 64, 64)
    random_resized_crop(x, (1.0, 1.25), torch.Generator().manual_seed(3))
    sizes, offsets = seen[0]
    assert set(sizes.tolist()) == set(range(64, 81))
    assert (offsets >= 0).all() and (offsets <= (sizes - 64)[:, None]).all()
    assert set(offsets[sizes == 80, 0].tolist()) == set(range(17)) and (offsets[sizes == 64] == 0).all()
    random_resized_crop(x, (1.0, 1.25), torch.Generator().manual_seed(3))
    assert torch.equal(seen[1][0], sizes) and torch.equal(seen[1][1], offsets)
    random_resized_crop(x[:10], (1.1, 1.1), torch.Generator().manual_seed(3))
    assert seen[2][0].tolist() == [71] * 10                         # ceil(1.1 · 64) = 71


def dataset(n=6, side=8):
    images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    return images, np.arange(n)                                    # label = index: tells which image came out


def test_batches_with_zoom_one_only_flip_and_are_seeded():
    images, labels = dataset()
    ref = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    x, y = next(Batches(images, labels, 32, flip="keep", seed=4, crop_scale=(1.0, 1.0)))
    flipped = [torch.equal(x[i], ref[y[i]].flip(-1)) for i in range(32)]
    assert all(torch.equal(x[i], ref[y[i]]) or flipped[i] for i in range(32)) and 0 < sum(flipped) < 32
    a, b, c = (next(Batches(images, labels, 32, flip="keep", seed=s, crop_scale=(1.0, 1.25))) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    kept = [torch.equal(a[0][i], ref[a[1][i]]) or torch.equal(a[0][i], ref[a[1][i]].flip(-1)) for i in range(32)]
    assert not all(kept)                                             # S = 8 (unchanged) has probability 1/3 here
    plain = next(Batches(images, labels, 32, flip="keep", seed=5))
    assert torch.equal(plain[0], next(Batches(images, labels, 32, flip="keep", seed=5, crop_scale=None))[0])


@pytest.mark.parametrize("text,want", [("off", None), ("OFF", None), ("1,1.25", (1.0, 1.25)), ("1.1,1.1", (1.1, 1.1))])
def test_flag_values(text, want):
    assert parse_crop_scale(text) == want


@pytest.mark.parametrize("text", ["0.8,1.25", "1.25,1", "1.25", "1,2,3", "a,b", "1,nan", "1,inf"])
def test_bad_flag_values(text):
    with pytest.raises(InputError, match="--classifier-crop-scale"):
        parse_crop_scale(text)


@pytest.mark.parametrize("flags,want", [
    (["--data", "celeba", "--data-dir", "C"], (1.0, 1.25)), (["--data", "folder", "--data-dir", "F"], (1.0, 1.25)),
    (["--data", "circles"], None), (["--data", "sizes"], None),
    (["--data", "celeba", "--data-dir", "C", "--classifier-crop-scale", "off"], None),
    (["--data", "circles", "--classifier-crop-scale", "1,1.5"], (1.0, 1.5))])
def test_defaults_per_data_set_and_the_override(flags, want):
    for preset in ("cpu", "paper"):
        run_config = config.build_config(config.parse_args([*flags, "--preset", preset]))
        assert run_config["classifier_train"]["crop_scale"] == want


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    make_celeba_tree(root, n=24, seed=2)
    return root


@pytest.mark.parametrize("data_set", ["celeba", "circles"])
def test_classifier_batches_are_zoomed_for_celeba_not_for_circles(data_set, celeba_root, tmp_path, monkeypatch):
    """train.py hands the run's crop_scale to the guidance classifier's batches (and none to the DDPM's), and saves
    it with the classifier."""
    import train
    made = []

    def spy(*args, **kwargs):
        made.append(kwargs.get("crop_scale"))
        return Batches(*args, **kwargs)

    monkeypatch.setattr(train.signal, "signal", lambda *a: None)
    monkeypatch.setattr(train, "Batches", spy)
    flags = [*TINY, "--no-overlap", "--steps", "1", "--classifier-steps", "1", "--eval-samples", "0"]
    if data_set == "celeba":
        flags += ["--data", "celeba", "--data-dir", str(celeba_root)]
    train.main([*flags, "--out", str(tmp_path / "run")])
    zoom = (1.0, 1.25) if data_set == "celeba" else None
    assert made == [None, zoom]                                    # the DDPM's batches, then the classifier's
    saved = json.loads((tmp_path / "run" / "classifier.json").read_text())["train"]["crop_scale"]
    assert saved == (list(zoom) if zoom else None)


@pytest.mark.parametrize("data_set", ["sizes", "circles"])
def test_sizes_and_circles_refuse_the_zoom(data_set, tmp_path, monkeypatch, capsys):
    """Their labels are the disc's size or position, which a zoom-crop changes."""
    import train
    monkeypatch.setattr(train.signal, "signal", lambda *a: None)
    with pytest.raises(SystemExit) as exit_:
        train.main([*TINY, "--data", data_set, "--classifier-crop-scale", "1,1.25", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--classifier-crop-scale off" in err and not (tmp_path / "x").exists()
