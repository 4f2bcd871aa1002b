"""Stroke thickness of digit images, measured exactly (no learned model): Morpho-MNIST's thickness morphometric.

Source: Castro et al., "Morpho-MNIST: Quantitative Assessment and Diagnostics for Representation Learning", JMLR
2019 [Morpho-MNIST]: upsample the grey image, binarise it, thin the binary digit to its skeleton, and take twice
the mean distance-transform value along the skeleton as the stroke's width. Where this differs from their code:
the skeleton is Zhang & Suen's parallel thinning (Zhang & Suen 1984, "A fast parallel algorithm for thinning
digital patterns", CACM 27(3)), written in numpy and vectorised over the batch, not scikit-image's medial axis;
the upsampling is OpenCV's bicubic resize, not scikit-image's Gaussian pyramid; the threshold is a fixed 128, not
half way between each image's darkest and brightest grey.

    images uint8 [N, H, W] --binarise--> masks bool [N, 4H, 4W] --skeletonize--> skeleton bool [N, 4H, 4W]
    thickness [N] = 2 * (mean of the distance transform over the skeleton) / 4      (px of the input image)

Outside the image counts as background everywhere (thinning and distance transform). Used by beyond/mnist.py to split
MNIST into thin / medium / thick digits and to measure the samples.
"""
import cv2
import numpy as np

from cli import InputError

SCALE = 4          # upsampling factor before binarising (Morpho-MNIST's): the skeleton and distances get 1/4 px steps
THRESHOLD = 128    # grey level a pixel must exceed to be stroke: half of the uint8 range (an MNIST digit's range)
CHUNK = 512        # images measured at once by stroke_thickness: bounds memory (under 100 MB at 28 px, scale 4)

# Zhang & Suen's neighbour order around P1: P2 (north), then clockwise P3 .. P9 (north-west), as (row, col) offsets.
# Bit k of a pixel's neighbourhood code is P(k + 2).
NEIGHBOURS = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]


def _deletable(first):
    """bool [256]: whether Zhang–Suen deletes a foreground pixel whose neighbourhood code (bits P2..P9) is the
    index, in the first (first=True) or second sub-iteration. The rules [Zhang & Suen 1984, conditions (a)-(d)]:
    (a) 2 <= B(P1) <= 6, B = number of foreground neighbours; (b) A(P1) = 1, A = number of 0 -> 1 transitions in
    the cyclic sequence P2, P3, ..., P9, P2; first sub-iteration (c) P2·P4·P6 = 0, (d) P4·P6·P8 = 0; second
    sub-iteration (c') P2·P4·P8 = 0, (d') P2·P6·P8 = 0."""
    table = np.zeros(256, dtype=bool)
    for code in range(256):
        p = [(code >> k) & 1 for k in range(8)]        # p[0] = P2 .. p[7] = P9
        P2, P4, P6, P8 = p[0], p[2], p[4], p[6]
        b = sum(p)
        a = sum(1 for k in range(8) if p[k] == 0 and p[(k + 1) % 8] == 1)
        if first:
            c, d = P2 * P4 * P6, P4 * P6 * P8
        else:
            c, d = P2 * P4 * P8, P2 * P6 * P8
        table[code] = 2 <= b <= 6 and a == 1 and c == 0 and d == 0
    return table


DELETABLE = (_deletable(True), _deletable(False))


def _as_images(images):
    """uint8 [N, H, W] from [N, H, W] or [N, H, W, 1]; InputError (a ValueError) for anything else."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(f"stroke images must be uint8 (0..255, white strokes on black), got {images.dtype}; "
                         f"pass uint8 [N, H, W] or [N, H, W, 1]")
    shape = images.shape
    if images.ndim == 4 and shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or 0 in images.shape[1:]:
        raise InputError(f"stroke images must be one-channel [N, H, W] or [N, H, W, 1], got shape {shape}; "
                         f"convert colour images to grey and pass a batch axis first")
    return images


def binarise(images, scale=SCALE, threshold=THRESHOLD):
    """Upsampled binary digits [Morpho-MNIST].

    images: uint8 [N, H, W] or [N, H, W, 1], white strokes on black (MNIST's polarity).
    Returns bool [N, scale·H, scale·W]: each image enlarged `scale` times with bicubic interpolation
    (cv2.INTER_CUBIC, pixel centres aligned as in cv2.resize), then > threshold. Bicubic (Morpho-MNIST also
    upsamples cubically): on antialiased strokes of known width at random angles and positions it measured slightly
    closer than bilinear (mean error +0.00 vs −0.01 px, rings −0.04 vs −0.06 px). Raises InputError (a ValueError)
    for another dtype or shape, e.g. RGB [N, H, W, 3], or a scale that is not a whole number >= 1.
    """
    images = _as_images(images)
    if not (isinstance(scale, (int, np.integer)) and scale >= 1):
        raise InputError(f"the upsampling scale must be a whole number >= 1, got {scale!r}; pass e.g. {SCALE}")
    n, h, w = images.shape
    if scale == 1:
        return images > threshold
    out = np.empty((n, scale * h, scale * w), dtype=bool)
    for i in range(n):
        out[i] = cv2.resize(images[i], (scale * w, scale * h), interpolation=cv2.INTER_CUBIC) > threshold
    return out


def _thin_padded(p):
    """Zhang–Suen thinning in place of uint8 0/1 [N, H + 2, W + 2] whose one-pixel frame is 0 (background).
    Each sub-iteration reads every pixel's 8 neighbours as they were before the sub-iteration (the algorithm is
    parallel), looks the deletion up in DELETABLE, and deletes in all images at once. An image that a full
    iteration (both sub-iterations) left unchanged is final and leaves the batch being thinned; thinning stops
    when no pixel changes in any image."""
    active = np.arange(len(p))
    work = p
    while len(active):
        n, h, w = work.shape[0], work.shape[1] - 2, work.shape[2] - 2
        inner = work[:, 1:h + 1, 1:w + 1]
        views = [work[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for dr, dc in NEIGHBOURS]
        code, shifted = np.empty((2, n, h, w), dtype=np.uint8)
        changed = np.zeros(n, dtype=bool)
        for table in DELETABLE:
            np.copyto(code, views[0])
            for k in range(1, 8):      # code = sum over k of P(k + 2) << k
                np.left_shift(views[k], k, out=shifted)
                code |= shifted
            delete = table[code]
            delete &= inner.astype(bool)
            changed |= delete.any(axis=(1, 2))
            inner[delete] = 0
        if work is not p:
            p[active] = work
        active = active[changed]
        work = p[active]
    return p


def skeletonize(masks):
    """Zhang–Suen thinning [Zhang & Suen 1984] of binary images, vectorised over the batch.

    masks: bool [N, H, W] (True = stroke). Returns bool [N, H, W], a subset of masks: the one-pixel-wide
    skeleton. Pixels outside the image count as background. Raises InputError for another shape.

    The algorithm's known flaw is kept (Lü & Wang 1986, "A comment on 'A fast parallel algorithm for thinning
    digital patterns'", CACM 29(3)): a 2 × 2 block is deleted entirely, and a stroke that thins to a perfect 45°
    staircase two pixels thick erodes to a few pixels. On the upsampled antialiased strokes of tests/test_morpho.py
    this happened only for strokes at exactly 45° (about 1 position in 30); their fix (3 <= B(P1)) measured
    strokes at other angles worse (errors up to 0.7 px), so it is not used.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise InputError(f"skeletonize takes bool masks [N, H, W], got shape {masks.shape}")
    out = np.zeros(masks.shape, dtype=bool)
    rows, cols = np.flatnonzero(masks.any(axis=(0, 2))), np.flatnonzero(masks.any(axis=(0, 1)))
    if len(rows) == 0:
        return out
    # Thin only the batch's bounding box (plus the background frame): outside it nothing can change.
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    p = np.zeros((masks.shape[0], r1 - r0 + 2, c1 - c0 + 2), dtype=np.uint8)
    p[:, 1:-1, 1:-1] = masks[:, r0:r1, c0:c1]
    out[:, r0:r1, c0:c1] = _thin_padded(p)[:, 1:-1, 1:-1].astype(bool)
    return out


def _distance_transform(masks):
    """float32 [N, H, W]: Euclidean distance (cv2.DIST_L2, DIST_MASK_PRECISE) from each stroke pixel's centre to
    the nearest background pixel's centre (0 on background), outside the image counting as background. The
    batch is transformed in one call as a tall image with a background row between images: the row between two
    images is nearer to every pixel of either than any pixel of the other."""
    n, h, w = masks.shape
    tall = np.zeros((n, h + 2, w + 2), dtype=np.uint8)
    tall[:, 1:-1, 1:-1] = masks
    dist = cv2.distanceTransform(tall.reshape(n * (h + 2), w + 2), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist.reshape(n, h + 2, w + 2)[:, 1:-1, 1:-1]


def stroke_thickness(images, scale=SCALE):
    """Mean stroke thickness of each image in pixels of the input image [Morpho-MNIST].

    images: uint8 [N, H, W] or [N, H, W, 1], white strokes on black. Returns float64 [N]:
        2 · (mean over skeleton pixels of the distance transform) / scale
    on the binarised `scale`-times-upsampled image; NaN for an image with no stroke pixel (or, rarely, whose
    skeleton Zhang–Suen erodes away: see skeletonize). Measured CHUNK images at a time; prints nothing. Raises
    InputError (a ValueError) for another dtype or shape.

    Pixel convention: the distance is from the skeleton pixel's centre to the nearest background pixel's centre,
    not to the stroke's edge half a pixel before it (no − 1/2 before doubling, as in Morpho-MNIST). For a stroke at
    a general angle some background pixel centre lies just outside the edge, so this distance is the half-width:
    antialiased strokes of known width 1.5 .. 5 px drawn at random angles and positions measure it with a mean
    error of +0.00 px (rings −0.04, lines +0.05), whereas subtracting 1/2 measures them 0.25 px = 1/scale too thin
    (tests/test_morpho.py). Along the pixel grid the measure moves in steps of 2/scale: a 0° or 90° stroke of
    width w measures w or w + 2/scale depending on its sub-pixel position (the skeleton lies on a pixel row), a
    45° one up to 0.33 px too thick.
    """
    images = _as_images(images)
    thickness = np.full(len(images), np.nan)
    for start in range(0, len(images), CHUNK):
        masks = binarise(images[start:start + CHUNK], scale)
        skeleton = skeletonize(masks)
        dist = _distance_transform(masks)
        count = skeleton.sum(axis=(1, 2))
        total = np.where(skeleton, dist, 0).sum(axis=(1, 2), dtype=np.float64)
        thickness[start:start + CHUNK] = np.where(count > 0, 2 * total / np.maximum(count, 1) / scale, np.nan)
    return thickness
