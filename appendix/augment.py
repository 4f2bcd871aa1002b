"""The guidance classifier's zoom-crop augmentation of the official CelebA classifiers (docs/paper_notes.md §3.2,
§16.14): each L × L image is upscaled bicubically to an integer side S ~ U{⌈A·L⌉..⌈B·L⌉} ((A, B) = (1, 1.25): S in
64..80 at L = 64), then a random L × L window is cut out (guided-diffusion's `random_crop_arr`; the flip follows in
data.Batches). Not part of the paper's method; its classifiers were trained with it, so `--preset paper` uses it on
CelebA and image folders (never on circles or sizes, whose labels are the disc's position or size).
"""
import math

import torch
import torch.nn.functional as F

from cli import InputError, parse_ints

OFFICIAL_CROP_SCALE = (1.0, 1.25)


def parse_crop_scale(text):
    """--classifier-crop-scale: "off" -> None; "A,B" -> (A, B), zoom factors 1 <= A <= B. Raises InputError."""
    scale = None if text.strip().lower() == "off" else parse_ints(text, "--classifier-crop-scale", float)
    if scale is not None and not (len(scale) == 2 and 1 <= scale[0] <= scale[1] < float("inf")):
        raise InputError(f"--classifier-crop-scale takes `off` or two zoom factors A,B with 1 <= A <= B "
                         f"(official CelebA: 1,1.25), got {text!r}")
    return scale


def resized_crop(x, sizes, offsets):
    """Zoom and crop (guided-diffusion's classifier augmentation): image i of x (float [N, C, L, L]) upscaled
    bicubically to sizes[i]² pixels (int [N], each >= L), then the L × L window at offsets[i] = (top, left) (int
    [N, 2], each in 0..sizes[i] - L) cut out, clamped to [-1, 1] (the official uint8 image clips); shape, dtype kept.

    Equals F.interpolate(x[i:i+1], size=S, mode="bicubic", align_corners=False)[..., top:top+L, left:left+L],
    computed for the whole batch in one grid_sample: output pixel j samples the input at (o + j + 0.5)·L/S - 0.5
    (pixel units). Torch's bicubic kernel (a = -0.75, edge pixels repeated) stands in for PIL's (a = -0.5) of the
    official code. Images with sizes[i] == L come back unchanged, bit for bit. Raises ValueError on non-square x.
    """
    h, w = x.shape[-2:]
    if h != w:
        raise ValueError(f"resized_crop takes square images, got {h}x{w}")
    zoom = sizes > w
    if not zoom.any():
        return x
    s, o = sizes[zoom].to(x.dtype), offsets[zoom].to(x.dtype)
    theta = torch.zeros(len(s), 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = w / s          # normalised coords: g = (L/S)·b + (L + 2o)/S - 1
    theta[:, 0, 2] = (w + 2 * o[:, 1]) / s - 1       # x: the left offset
    theta[:, 1, 2] = (w + 2 * o[:, 0]) / s - 1       # y: the top offset
    grid = F.affine_grid(theta.to(x.device), [len(s), x.shape[1], h, w], align_corners=False)
    out = x.clone()
    out[zoom] = F.grid_sample(x[zoom], grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(-1, 1)
    return out


def random_resized_crop(x, scale, generator):
    """resized_crop with the official CelebA classifier's draws (random_crop_arr, docs/paper_notes.md §3.2): per
    image an integer side S ~ U{⌈A·L⌉..⌈B·L⌉} for scale = (A, B) (L = 64, (1, 1.25): S in 64..80), then top and
    left offsets each ~ U{0..S-L}; all from `generator`. x: float [N, C, L, L]."""
    n, side = x.shape[0], x.shape[-1]
    lo, hi = (math.ceil(side * f - 1e-9) for f in scale)
    sizes = torch.randint(lo, hi + 1, (n,), generator=generator)
    offsets = (torch.rand(n, 2, generator=generator) * (sizes - side + 1)[:, None]).long()
    return resized_crop(x, sizes, offsets)
