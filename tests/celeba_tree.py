"""A miniature CelebA in the standard release layout, for tests (no CelebA here).

Each 178×218 JPEG is a face-like drawing: a skin ellipse, two eyes, hair on top, and a mouth whose
curvature c ∈ [-1, 1] is the latent "smile" (Smiling = c > 0); hair is black or blond (Black_Hair /
Blond_Hair), and Young is random. The attribute file uses ±1 (or 0/1) like the release (or its CSV variant).
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ATTRS = ["Black_Hair", "Blond_Hair", "Smiling", "Young"]


def draw_face(curvature, black_hair, rng):
    img = Image.new("RGB", (178, 218), tuple(int(v) for v in rng.integers(60, 200, 3)))
    d = ImageDraw.Draw(img)
    d.rectangle([29, 20, 149, 90], fill=(20, 15, 10) if black_hair else (235, 205, 90))      # hair
    d.ellipse([39, 40, 139, 190], fill=(225, 180, 150))                                     # face
    for ex in (70, 108):
        d.ellipse([ex - 6, 95, ex + 6, 105], fill=(30, 30, 30))                            # eyes
    bend = int(round(22 * curvature))                                                       # mouth
    top, bottom = 150 - max(bend, 0), 150 + max(-bend, 0)
    box = [62, min(top, bottom) - abs(bend), 116, max(top, bottom) + abs(bend) + 1]
    if bend >= 0:   # smile: lower half of an ellipse
        d.chord(box, 0, 180, fill=(160, 30, 40))
    else:           # frown: upper half
        d.chord(box, 180, 360, fill=(160, 30, 40))
    d.line([62, 150, 116, 150], fill=(120, 20, 30), width=3)
    return img


def make_celeba_tree(root, n=120, seed=0, csv=False, zero_one=False, splits=(0.7, 0.15)):
    """Write ROOT/img_align_celeba/*.jpg, list_attr_celeba, list_eval_partition; return the latents.

    Returns dict(curvature [n], black_hair [n], split [n]) in file order.
    """
    root = Path(root)
    (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    curvature = rng.uniform(-1, 1, n)
    black = rng.random(n) < 0.5
    young = rng.random(n) < 0.5
    split = np.where(np.arange(n) < splits[0] * n, 0, np.where(np.arange(n) < (splits[0] + splits[1]) * n, 1, 2))
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    for f, c, b in zip(files, curvature, black):
        draw_face(c, b, rng).save(root / "img_align_celeba" / f, quality=95)
    values = np.stack([black, ~black, curvature > 0, young], 1).astype(int)
    values = values if zero_one else 2 * values - 1
    if csv:
        rows = ["image_id," + ",".join(ATTRS)] + [f + "," + ",".join(map(str, v)) for f, v in zip(files, values)]
        (root / "list_attr_celeba.csv").write_text("\n".join(rows) + "\n")
        rows = ["image_id,partition"] + [f"{f},{s}" for f, s in zip(files, split)]
        (root / "list_eval_partition.csv").write_text("\n".join(rows) + "\n")
    else:
        rows = [str(n), " ".join(ATTRS)] + [f + " " + " ".join(f"{v:2d}" for v in vals) for f, vals in zip(files, values)]
        (root / "list_attr_celeba.txt").write_text("\n".join(rows) + "\n")
        (root / "list_eval_partition.txt").write_text("\n".join(f"{f} {s}" for f, s in zip(files, split)) + "\n")
    return dict(curvature=curvature, black_hair=black, split=split)
