"""CelebA loading from the standard release layout, on a generated miniature tree."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from celeba_tree import make_celeba_tree
from data import DataError, celeba_split, load_images, oversample, read_celeba_attributes

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


def test_oversample_repeats_a_class():
    images, labels = np.arange(5)[:, None], np.array([0, 1, 0, 1, 1])
    im, lab = oversample(images, labels, "0:2")
    assert (lab == 0).sum() == 4 and (lab == 1).sum() == 3
    with pytest.raises(DataError, match="--oversample"):
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
