"""Extrapolation on circles: [ZSI] Sec. 7's question and App. E's green lips, each measured on a laptop.

Sec. 7 hypothesises that extrapolating needs an unconditional model "capable to generate examples significantly
different from the training distribution" and a guidance towards them. `--data quadrant` (data.quadrant_dataset,
the official code's unreported circles setup) trains the DDPM on discs in the top-left quadrant only (centres x, y
< W/2) and the guidance classifier on discs anywhere, labelled by the half of the centre (x ≥ W/2); guiding
towards class 1 (`--lambdas 0,30`) asks for discs right of the training support. `quadrant_report` says where the
centres land.

App. E guided a CelebA DDPM with a classifier of faces whose lips were painted green, which the DDPM never saw.
`--data green` (data.green_pairs) trains the DDPM on white discs and the classifier on the same images with the
disc white (label 0) or GREEN (label 1); guiding towards class 1 asks for a colour the DDPM never drew.
`green_report` measures the discs' colour.
"""
import cv2
import numpy as np

from data import load_data
from evaluate import MIN_AREA, detect_circles, log_count_heatmap, plot_histograms, plot_log_heatmaps

GREEN_HUE = (40, 80)       # OpenCV hue (0-180, green = 60): 80°-160°, where a painted disc reads as green
GREEN_SATURATION = 0.5     # and at least this saturated (1 = a pure colour, 0 = white or grey)


def quadrant_metrics(images):
    """Shares of all N images: one disc (`one_disc`), one disc in the training quadrant x, y < W/2
    (`in_training_quadrant`), one disc outside it (`beyond_support`), one disc with x ≥ W/2 (`right_half`, the
    guided class) or y ≥ W/2 (`lower_half`), 0 or 2+ discs (`broken`); and the one-disc centres x/W, y/W.
    images: uint8 [N, H, W, 3]. Centres are blob centroids in pixel units, so a disc centred on pixel c reads c."""
    w = images.shape[2]
    found = detect_circles(images)
    centres = np.array([c[0] for n, c, _ in found if n == 1]).reshape(-1, 2)
    half = w // 2
    right, lower = centres[:, 0] >= half, centres[:, 1] >= half
    share = lambda mask: float(mask.sum() / len(images))
    return dict(one_disc=share(np.ones(len(centres), bool)), in_training_quadrant=share(~right & ~lower),
                beyond_support=share(right | lower), right_half=share(right), lower_half=share(lower),
                broken=sum(n != 1 for n, _, _ in found) / len(images), x=centres[:, 0] / w, y=centres[:, 1] / w)


def quadrant_report(samples, data_config, label, out):
    """sample.py's numbers for --data quadrant (quadrant_metrics) and its pictures: the histograms of centre x/W and
    y/W against the DDPM's and the classifier's training data, and the log-count heatmaps of the centres."""
    m = quadrant_metrics(samples)
    seen = {name: quadrant_metrics(load_data(data_config, role)[0]) for name, role in
            (("DDPM's training data", "ddpm"), ("classifier's training data", "classifier"))}
    for axis in ("x", "y"):
        plot_histograms({**{k: v[axis] for k, v in seen.items()}, label: m[axis]}, out / f"histogram_{axis}.png",
                        f"disc centre {axis}/W (single-disc images)", bins=32, marks=(0.5,))
    bins = samples.shape[2] // 2                                   # 2 px per bin: no aliasing of integer centres
    plot_log_heatmaps({f"{k}: ln(count)": log_count_heatmap(v["x"], v["y"], bins) for k, v in
                       {"DDPM's training data": seen["DDPM's training data"], label: m}.items()},
                      out / "heatmap_centres.png", "centre x/W", "centre y/W (0: the top row)")
    report = {k: v for k, v in m.items() if k not in ("x", "y")}
    print(f"[sample] quadrant: {m['beyond_support'] * 100:.1f}% of samples have one disc outside the training "
          f"quadrant ({m['right_half'] * 100:.1f}% right of W/2, {m['lower_half'] * 100:.1f}% below) | "
          f"{m['in_training_quadrant'] * 100:.1f}% inside it | 0 or 2+ discs {m['broken'] * 100:.1f}%", flush=True)
    return report


def disc_colours(images, threshold=127, min_area=MIN_AREA):
    """Per image: (number of blobs of >= min_area pixels whose brightest channel exceeds threshold, and for one
    blob its mean RGB in 0..255 [3], else None). Brightness, not grey level: a pure green disc (0, 255, 0) has a grey
    level of 150 but a brightest channel of 255."""
    out = []
    for img in images:
        mask = (img.max(axis=-1) > threshold).astype(np.uint8)
        k, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = [i for i in range(1, k) if stats[i, cv2.CC_STAT_AREA] >= min_area]
        out.append((len(keep), img[labels == keep[0]].mean(axis=0) if len(keep) == 1 else None))
    return out


def green_metrics(images):
    """Shares of all N images: one disc (`one_disc`), one green disc (`green`: hue in GREEN_HUE, saturation >=
    GREEN_SATURATION), one white or grey disc (`white`: saturation < GREEN_SATURATION), 0 or 2+ discs (`broken`);
    the one-disc discs' saturation and greenness G − max(R, B) in 0..1 (`saturation`, `greenness`)."""
    found = disc_colours(images)
    rgb = np.array([c for n, c in found if n == 1], dtype=np.float64).reshape(-1, 3)
    hsv = cv2.cvtColor(np.clip(rgb, 0, 255).astype(np.uint8)[None], cv2.COLOR_RGB2HSV)[0].astype(np.float64)
    hue, saturation = hsv[:, 0], hsv[:, 1] / 255
    green = (hue >= GREEN_HUE[0]) & (hue <= GREEN_HUE[1]) & (saturation >= GREEN_SATURATION)
    n = len(images)
    return dict(one_disc=len(rgb) / n, green=float(green.sum() / n),
                white=float((saturation < GREEN_SATURATION).sum() / n), broken=sum(k != 1 for k, _ in found) / n,
                saturation=saturation, greenness=(rgb[:, 1] - np.maximum(rgb[:, 0], rgb[:, 2])) / 255)


def green_report(samples, label, out):
    """sample.py's numbers for --data green (green_metrics, with the median saturation and greenness of the
    one-disc samples) and the histogram of their greenness."""
    m = green_metrics(samples)
    median = lambda v: float(np.median(v)) if len(v) else None
    report = dict(one_disc=m["one_disc"], green_disc=m["green"], white_disc=m["white"], broken=m["broken"],
                  median_saturation=median(m["saturation"]), median_greenness=median(m["greenness"]))
    plot_histograms({label: m["greenness"]}, out / "histogram_greenness.png",
                    "greenness G − max(R, B) of the disc, 0..1 (single-disc images)", bins=40, marks=())
    print(f"[sample] green: {m['green'] * 100:.1f}% of samples have one green disc, {m['white'] * 100:.1f}% one "
          f"white disc | 0 or 2+ discs {m['broken'] * 100:.1f}%", flush=True)
    return report
