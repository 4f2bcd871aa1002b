"""An independent blob counter for tests: the oracle the sample reports are checked against.

Written from the definitions of evaluate.py's docstring, not from its code (no OpenCV): a pixel is bright when its
BT.601 luma 0.299 R + 0.587 G + 0.114 B rounds above 127; blobs are 8-connected groups of bright pixels, found by
flood fill; a blob of at least `min_area` (5) pixels that does not span the image's whole width (a bright
background) is a circle, its centre the mean of its pixel coordinates.
"""
import numpy as np

MIN_AREA = 5


def blobs(image, min_area=MIN_AREA):
    """[(area, centre x, centre y)] of the 8-connected bright blobs of one uint8 image [H, W, 3] or [H, W]."""
    img = np.asarray(image, dtype=np.float64)
    luma = img @ np.array([0.299, 0.587, 0.114]) if img.ndim == 3 else img
    bright = luma > 127.5
    seen = np.zeros_like(bright)
    h, w = bright.shape
    found = []
    for y0 in range(h):
        for x0 in range(w):
            if not bright[y0, x0] or seen[y0, x0]:
                continue
            seen[y0, x0] = True
            stack, pixels = [(y0, x0)], []
            while stack:
                y, x = stack.pop()
                pixels.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and bright[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
            ys, xs = np.array(pixels, dtype=np.float64).T
            if len(pixels) >= min_area and xs.max() - xs.min() + 1 < w:
                found.append((len(pixels), xs.mean(), ys.mean()))
    return found


def single_circle_x(images):
    """Per image: the centre x / W of its one circle, or None when it holds 0 or 2+ circles."""
    out = []
    for img in images:
        b = blobs(img)
        out.append(b[0][1] / img.shape[1] if len(b) == 1 else None)
    return out


def middle_fraction(images, middle=(0.2, 0.8)):
    """(fraction of all images with one circle centred at x / W in `middle`, fraction with 0 or 2+ circles)."""
    xs = single_circle_x(images)
    inside = sum(x is not None and middle[0] <= x <= middle[1] for x in xs)
    return inside / len(images), sum(x is None for x in xs) / len(images)
