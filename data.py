"""Datasets, batches and image files.

Circles ([ZSI] Sec. 5.5, EXPERIMENTS.md §10): a black RGB image with one white filled disc of radius r at an
integer centre (x, y), drawn with PIL's `ellipse([x-r, y-r, x+r, y+r])` like the official generator. The
training support holds only the extremes x ∈ [0, δ] ∪ [1-δ, 1] of the width (δ = 0.2: with W = 64,
x ∈ {2..11} ∪ {52..61}; with W = 32, x ∈ {2..5} ∪ {26..29}), y over the full range, every (x, y) pair once;
the label is 1{x ≥ W/2} (right border). The "full range" variant covers every x and is the reference for
the evaluation and the classifier heatmap. Everything is deterministic given the seed.

Image folders: PNG/JPEG files named `{label}_{k}.png` (the official loader's convention: classes are the
string-sorted filename prefixes) or any names (one class). Pixels map to [-1, 1] as x = u8 / 127.5 - 1.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """Bad dataset input; the entry points print it as a one-line error."""


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
    pos = pos[np.random.default_rng(seed).permutation(len(pos))]
    labels = (pos[:, 0] >= image_size // 2).astype(np.int64)
    return render_circles(pos, image_size, radius), labels, pos


# ---------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------

def load_image_folder(folder, image_size=None):
    """(images uint8 [N, H, W, 3], labels int64 [N], class names) from `{label}_{k}.png` files."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; pass --data-dir pointing at PNG/JPEG files")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no .png/.jpg files in {folder}; expected files named {{label}}_{{k}}.png")
    prefixes = [p.name.split("_")[0] if "_" in p.name else "0" for p in files]
    classes = sorted(set(prefixes))
    images = []
    for p in files:
        img = Image.open(p).convert("RGB")
        if image_size is not None and img.size != (image_size, image_size):
            img = center_crop_resize(img, image_size)
        images.append(np.asarray(img))
    if len({im.shape for im in images}) > 1:
        raise DataError(f"images in {folder} have different sizes; pass --image-size to resize them")
    return np.stack(images), np.array([classes.index(c) for c in prefixes], dtype=np.int64), classes


def center_crop_resize(img, size):
    """Centre square crop of the short side, then a bilinear antialiased resize (CelebA: 178 -> 64)."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BILINEAR, reducing_gap=None)


# ---------------------------------------------------------------------------------------------------
# Batches and conversions
# ---------------------------------------------------------------------------------------------------

def to_float(images_u8):
    """uint8 [N, H, W, C] numpy/tensor -> float32 [N, C, H, W] in [-1, 1]."""
    x = torch.as_tensor(images_u8)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(x):
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C], clamp((x+1)·127.5) then truncate (official)."""
    return ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Batches:
    """Endless random minibatches from an in-memory uint8 dataset, reproducible from a torch.Generator.

    flip: random horizontal flips; flip_labels swaps class 0 and 1 of the flipped examples (circles: the
    mirror image of a left circle is a right circle). shard=(rank, world) keeps every world-th example.
    """

    def __init__(self, images, labels, batch_size, flip=False, flip_labels=False, seed=0, shard=(0, 1)):
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        rank, world = shard
        self.images = torch.as_tensor(images[rank::world]).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(labels[rank::world])
        self.batch_size, self.flip, self.flip_labels = batch_size, flip, flip_labels
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return len(self.labels)

    def __iter__(self):
        return self

    def __next__(self):
        idx = torch.randint(0, len(self.labels), (self.batch_size,), generator=self.generator)
        x, y = self.images[idx].float() / 127.5 - 1, self.labels[idx].clone()
        if self.flip:
            flip = torch.rand(self.batch_size, generator=self.generator) < 0.5
            x[flip] = x[flip].flip(-1)
            if self.flip_labels:
                y[flip] = 1 - y[flip]
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
    """Save a PNG grid of uint8 [N, H, W, C] images, upscaled by `scale` (nearest) for small images."""
    img = Image.fromarray(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
