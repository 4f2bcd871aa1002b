"""CelebA loading from the standard release layout, on a generated miniature tree."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from celeba_tree import make_celeba_tree
from cli import InputError
from data import celeba_split, load_images, oversample, read_celeba_attributes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    return root, make_celeba_tree(root, n=40, seed=1)


def test_attribute_and_partition_formats_agree(tree, tmp_path):
    root, latent = tree
    other = tmp_path / "csv01"
    make_celeba_tree(other, n=40, seed=1, csv=True, zero_one=True)
    a, b = read_celeba_attributes(root), read_celeba_attributes(other)
    assert a[0] == b[0] and a[1] == b[1] and np.array_equal(a[2], b[2])
    assert np.array_equal(a[2][:, a[1].index("Smiling")], latent["curvature"] > 0)
    pa, la, _, _, _ = celeba_split(root, ["Smiling"], "valid")
    pb, lb, _, _, _ = celeba_split(other, ["Smiling"], "valid")
    assert [p.name for p in pa] == [p.name for p in pb] and np.array_equal(la, lb)
    assert len(pa) == int((latent["split"] == 1).sum())


def test_split_subset_and_labels(tree, tmp_path):
    root, latent = tree
    train = np.flatnonzero(latent["split"] == 0)
    paths, labels, _, _, _ = celeba_split(root, ["Smiling"], "train")
    assert len(paths) == len(train)
    assert np.array_equal(labels, (latent["curvature"][train] > 0).astype(int))
    index = tmp_path / "subset.txt"
    index.write_text("3\n0\n5\n")
    paths, labels, _, _, _ = celeba_split(root, ["Smiling"], "train", index)
    assert [p.name for p in paths] == [f"{train[i] + 1:06d}.jpg" for i in (3, 0, 5)]
    # two attributes: 0 = a & b, 1 = a & not b, 2 = not a & b, 3 = not a & not b (App. F order)
    _, four, _, _, _ = celeba_split(root, ["Smiling", "Black_Hair"], "train")
    smile, black = latent["curvature"][train] > 0, latent["black_hair"][train]
    expected = np.select([smile & black, smile & ~black, ~smile & black], [0, 1, 2], 3)
    assert np.array_equal(four, expected)


def test_images_are_centre_cropped_and_resized(tree):
    root, _ = tree
    paths, _, _, _, _ = celeba_split(root, ["Smiling"], "test")
    images = load_images(paths[:3], 32)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    # the face (skin colour) fills the centre of the 178x178 crop
    assert abs(int(images[0, 20, 16, 0]) - 225) < 30


@pytest.mark.parametrize("size", [64, 128])
def test_crop_removes_the_top_and_bottom_20_rows(tmp_path, size):
    """178x218 -> the centre 178x178 square (rows 20..197) -> size x size: the paper's 64 and the 128 option."""
    from PIL import Image
    img = np.zeros((218, 178, 3), np.uint8)
    img[:, :, 2] = 255                       # blue inside the crop
    img[:20, :, 0] = img[198:, :, 0] = 255   # red bands that must be cropped away
    img[20:198, :89, 1] = 255                # left half green: the crop keeps the full width
    Image.fromarray(img).save(tmp_path / "face.png")
    out = load_images([tmp_path / "face.png"], size)[0].astype(int)
    assert out.shape == (size, size, 3)
    assert out[..., 0].max() == 0
    assert (out[:, : size // 2 - 1, 1] > 250).all() and (out[:, size // 2 + 1:, 1] < 5).all()


def test_oversample_repeats_a_class():
    images, labels = np.arange(5)[:, None], np.array([0, 1, 0, 1, 1])
    im, lab = oversample(images, labels, "0:2")
    assert (lab == 0).sum() == 4 and (lab == 1).sum() == 3
    with pytest.raises(InputError, match="--oversample"):
        oversample(images, labels, "zero:2")


@pytest.mark.parametrize("breakage,message", [
    ("no_root", "does not exist"),
    ("no_images", "img_align_celeba is missing"),
    ("no_attr", "list_attr_celeba.txt (or .csv) is missing"),
    ("bad_attr", "malformed"),
    ("bad_partition", "malformed"),
    ("bad_attr_name", "--attr"),
])
def test_bad_celeba_tree_is_one_line_error_before_work(tree, tmp_path, breakage, message):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(tree[0], root)
    attr = "Smiling"
    if breakage == "no_root":
        shutil.rmtree(root)
    elif breakage == "no_images":
        shutil.rmtree(root / "img_align_celeba")
    elif breakage == "no_attr":
        (root / "list_attr_celeba.txt").unlink()
    elif breakage == "bad_attr":
        lines = (root / "list_attr_celeba.txt").read_text().splitlines()
        (root / "list_attr_celeba.txt").write_text("\n".join(lines[:3] + ["000004.jpg 1 x 1"] + lines[4:]))
    elif breakage == "bad_partition":
        (root / "list_eval_partition.txt").write_text("000001.jpg zero\n")
    else:
        attr = "Smilling"
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "celeba", "--data-dir", str(root),
                           "--attr", attr, "--out", str(out), "--image-size", "16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("size,mult", [(64, (1, 2, 3, 4)), (128, (1, 1, 2, 3, 4))])
def test_paper_preset_at_64_and_128_px(tree, size, mult):
    """--preset paper --image-size 128: the official 128 px U-Net and classifier layouts (64: the paper's)."""
    import config
    root, _ = tree
    run_config = config.build_config(config.parse_args(["--data", "celeba", "--data-dir", str(root), "--preset", "paper",
                                               "--image-size", str(size)]))
    assert run_config["data"]["image_size"] == run_config["unet"]["image_size"] == size
    assert tuple(run_config["unet"]["channel_mult"]) == mult and tuple(run_config["classifier"]["channel_mult"]) == mult
    assert run_config["unet"]["model_channels"] == 128 and run_config["train"]["steps"] == 250_000
