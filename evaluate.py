"""Evaluation: circle detection and accuracy, histogram divergences to uniform, and the pictures.

Circles ([ZSI] Sec. 5.5; EXPERIMENTS.md §10): each sample is thresholded (grey > 127) and split into
8-connected components with OpenCV; a component's centre is its centroid (first image moments). A sample is
valid when it holds exactly one blob. "Accuracy" is the fraction of *all* samples with exactly one blob whose
centre x/W lies in the unseen middle [0.2, 0.8]; the fraction with 0 or ≥2 blobs is reported beside it.

Divergence of a histogram to uniform ([ZSI] Sec. 5, App. B; EXPERIMENTS.md §5.3), 100 bins, h normalised
to sum 1: KLD = Σ h_i ln(h_i · 100) with 0 ln 0 = 0 (nats), and the paper's "MSE" = sqrt(Σ (h_i - 1/100)²),
which is an L2 norm, not a mean squared error. `paper_exact=True` bins over the sample's own [min, max] as
the paper's scripts do (`plt.hist` without a range); `paper_exact=False` bins over [0, 1], the clean
variant (values can differ; both are reported, named honestly).
"""
import json
from pathlib import Path

import cv2
import numpy as np
import torch


# ---------------------------------------------------------------------------------------------------
# Circles
# ---------------------------------------------------------------------------------------------------

def detect_circles(images, threshold=127):
    """Per image: (number of blobs, centres [k, 2] as (x, y) floats). images: uint8 [N, H, W, 3] or [N, H, W]."""
    out = []
    for img in images:
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
        mask = (grey > threshold).astype(np.uint8)
        n, _, _, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        out.append((n - 1, centroids[1:]))                          # component 0 is the background
    return out


def circle_metrics(images, middle=(0.2, 0.8)):
    """accuracy (one blob, centre x/W in `middle`), invalid fractions and the single-blob x/W values."""
    w = images.shape[2]
    found = detect_circles(images)
    counts = np.array([n for n, _ in found])
    x = np.array([c[0, 0] / w for n, c in found if n == 1])
    in_middle = ((x >= middle[0]) & (x <= middle[1])).sum()
    return dict(n=len(images), accuracy=float(in_middle / len(images)),
                zero_circles=float((counts == 0).mean()), multi_circles=float((counts >= 2).mean()),
                invalid=float((counts != 1).mean()), x=x)


def classifier_heatmap(classifier, image_size, radius=2, t=0, device="cpu", batch_size=256, target=1):
    """p(y = target | one circle at (x, y), t) on the full grid; [len(ys), len(xs)] array and the coords."""
    from data import render_circles, to_float
    coords = np.arange(radius, image_size - radius)
    pos = np.array([(x, y) for y in coords for x in coords])
    probs = []
    with torch.no_grad():
        for i in range(0, len(pos), batch_size):
            x = to_float(render_circles(pos[i:i + batch_size], image_size, radius)).to(device)
            tt = torch.full((len(x),), t, dtype=torch.long, device=device)
            probs.append(torch.softmax(classifier(x, tt), dim=-1)[:, target].cpu())
    return torch.cat(probs).numpy().reshape(len(coords), len(coords)), coords


# ---------------------------------------------------------------------------------------------------
# Histogram divergence to uniform
# ---------------------------------------------------------------------------------------------------

def histogram(values, bins=100, paper_exact=True):
    """Bin fractions h (sum 1). paper_exact: bins over [min, max] of `values`; else over [0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    rng = (values.min(), values.max()) if paper_exact else (0.0, 1.0)
    if rng[0] == rng[1]:  # matplotlib's convention for a constant sample: a unit-wide range around it
        rng = (rng[0] - 0.5, rng[1] + 0.5)
    counts, _ = np.histogram(values, bins=bins, range=rng)
    return counts / counts.sum()


def divergence_to_uniform(h):
    """(KLD(h || U) in nats with 0 ln 0 = 0, the paper's "MSE" = L2 norm ||h - U||) for bin fractions h."""
    h = np.asarray(h, dtype=np.float64)
    u = 1.0 / len(h)
    nz = h > 0
    return float(np.sum(h[nz] * np.log(h[nz] / u))), float(np.sqrt(np.sum((h - u) ** 2)))


def uniformity_report(values, bins=100):
    """KLD and L2 to uniform, the paper-exact ([min, max] bins) and the clean ([0, 1] bins) variants."""
    kld_p, l2_p = divergence_to_uniform(histogram(values, bins, paper_exact=True))
    kld_c, l2_c = divergence_to_uniform(histogram(values, bins, paper_exact=False))
    return dict(kld_paper=kld_p, mse_paper=l2_p, kld_01=kld_c, l2_01=l2_c)


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_histograms(named_values, path, xlabel, bins=100, log=False, span=(0, 1), marks=(0.2, 0.8)):
    """Overlaid density histograms (alpha 0.5), e.g. circle centre x/W of training data vs samples."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in named_values.items():
        if len(values):
            ax.hist(values, bins=bins, range=span, alpha=0.5, density=True, label=f"{name} (n={len(values)})")
    for m in marks:
        ax.axvline(m, color="k", ls=":", lw=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmaps(named_maps, coords, path, image_size):
    """Side-by-side heatmaps of p(right | circle at (x, y)) (Fig. 7b), x/W on the horizontal axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(named_maps), figsize=(4.2 * len(named_maps), 3.6), squeeze=False)
    extent = [coords[0] / image_size, coords[-1] / image_size, coords[-1], coords[0]]
    for ax, (name, m) in zip(axes[0], named_maps.items()):
        im = ax.imshow(m, extent=extent, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for v in (0.2, 0.8):
            ax.axvline(v, color="w", ls=":", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("circle centre x / W")
        ax.set_ylabel("y (px)")
        fig.colorbar(im, ax=ax, label="p(right)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overview(unguided, guided, named_values, path, title=""):
    """One figure for people: unguided samples | guided samples | histogram of circle centres."""
    from data import make_grid
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), gridspec_kw=dict(width_ratios=[1, 1, 1.35]))
    for ax, (name, imgs) in zip(axes[:2], (("unguided", unguided), (title or "guided", guided))):
        ax.imshow(make_grid(imgs[:64], nrow=8), interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    ax = axes[2]
    for name, values in named_values.items():
        if len(values):
            ax.hist(values, bins=50, range=(0, 1), alpha=0.5, density=True, label=name)
    for m in (0.2, 0.8):
        ax.axvline(m, color="k", ls=":", lw=1)
    ax.set_xlabel("circle centre x / W")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report, folder, title, stem="report"):
    """<stem>.json (machine-readable) and <stem>.md (a table for people) in `folder`."""
    folder = Path(folder)
    clean = {k: v for k, v in report.items() if not isinstance(v, np.ndarray)}
    (folder / f"{stem}.json").write_text(json.dumps(clean, indent=2, default=float) + "\n")
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in clean.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        lines.append(f"| {k} | {v} |")
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
