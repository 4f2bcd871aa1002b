"""Evaluation: circle detection and accuracy, histogram divergences to uniform, and the pictures.

Circles ([ZSI] Sec. 5.5; docs/paper_notes.md §10): each sample is thresholded (grey > 127) and split into
8-connected components with OpenCV; a component's centre is its centroid (first image moments). Components
smaller than `min_area` pixels (default 5, a quarter of the 21-pixel radius-2 disc) are sampling grain, not
circles, and are ignored, as is a component spanning the whole width (a white background, not an object:
`detect_circles`); the counts with every component ("any size") are reported too. A sample is valid when it
holds exactly one circle. "Accuracy" is the fraction of *all* samples with exactly one circle whose centre x/W
lies in the unseen middle [0.2, 0.8]; the fraction with 0 or ≥2 circles is reported beside it.

Divergence of a histogram to uniform ([ZSI] Sec. 5, App. B; docs/paper_notes.md §5.3), 100 bins, h normalised
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

from infra import checkpoint as ckpt_io
from cli import InputError
from data import circles_dataset, make_grid, render_circles, sizes_dataset, to_float
from infra.device import host_info


# ---------------------------------------------------------------------------------------------------
# Circles
# ---------------------------------------------------------------------------------------------------

MIN_AREA = 5


def detect_circles(images, threshold=127, min_area=MIN_AREA):
    """Per image: (number of blobs of >= min_area pixels, their centres [k, 2] as (x, y) floats, their areas).

    images: uint8 [N, H, W, 3] or [N, H, W].

    A component that spans the image's whole width is background, not a blob, and is ignored like grain: an
    all-white (or mostly white) image is one such component, whose centroid x/W is near 0.5 because it fills the
    frame, not because of any object, and it used to count as one circle in the middle (a blank white sample
    scored accuracy 1).
    No object of the data spans the width (circles: 5 px; sizes: 2 r_max + 1 <= W - 3 px, config.py's r_max).
    """
    out = []
    for img in images:
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if img.ndim == 3 else img
        mask = (grey > threshold).astype(np.uint8)
        _, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        area = stats[1:, cv2.CC_STAT_AREA]                          # component 0 is the background
        keep = (area >= min_area) & (stats[1:, cv2.CC_STAT_WIDTH] < mask.shape[1])
        out.append((int(keep.sum()), centroids[1:][keep], area[keep]))
    return out


def circle_metrics(images, middle=(0.2, 0.8), min_area=MIN_AREA):
    """accuracy (one circle, centre x/W in `middle`), invalid fractions and the single-circle x/W values,
    plus the same two numbers counting blobs of any size (`*_any_size`)."""
    w = images.shape[2]

    def summary(found):
        counts = np.array([n for n, _, _ in found])
        x = np.array([c[0, 0] / w for n, c, _ in found if n == 1])
        return counts, x, float(((x >= middle[0]) & (x <= middle[1])).sum() / len(images))

    counts, x, accuracy = summary(detect_circles(images, min_area=min_area))
    counts_any, _, accuracy_any = summary(detect_circles(images, min_area=1))
    return dict(n=len(images), accuracy=accuracy, zero_circles=float((counts == 0).mean()),
                multi_circles=float((counts >= 2).mean()), invalid=float((counts != 1).mean()), x=x,
                accuracy_any_size=accuracy_any, invalid_any_size=float((counts_any != 1).mean()))


def classifier_heatmap(classifier, image_size, radius=2, t=0, device="cpu", batch_size=256, target=1):
    """p(y = target | one circle at (x, y), t) on the full grid; [len(ys), len(xs)] array and the coords."""
    coords = np.arange(radius, image_size - radius)
    pos = np.array([(x, y) for y in coords for x in coords])
    probs = []
    with torch.no_grad():
        for i in range(0, len(pos), batch_size):
            x = to_float(render_circles(pos[i:i + batch_size], image_size, radius)).to(device)
            tt = torch.full((len(x),), t, dtype=torch.long, device=device)
            probs.append(torch.softmax(classifier(x, tt), dim=-1)[:, target].cpu())
    return torch.cat(probs).numpy().reshape(len(coords), len(coords)), coords


def size_metrics(images, r_min, r_max, middle=(0.2, 0.8)):
    """Object sizes (App. K): radius r̂ = sqrt(area / π) - 0.5 of each single-blob sample (PIL's inclusive
    bounding box draws a disc of radius r + 1/2 pixels; the test fits this on every drawn radius), normalised
    z = (r̂ - r_min) / (r_max - r_min); accuracy = fraction of all samples with one blob and z in `middle`."""
    found = detect_circles(images)
    r = np.array([np.sqrt(a[0] / np.pi) - 0.5 for n, _, a in found if n == 1])
    z = (r - r_min) / (r_max - r_min)
    counts = np.array([n for n, _, _ in found])
    return dict(n=len(images), accuracy=float(((z >= middle[0]) & (z <= middle[1])).sum() / len(images)),
                invalid=float((counts != 1).mean()), radius=r, z=z)


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
# Sample files: guided-diffusion's layout
# ---------------------------------------------------------------------------------------------------

def save_samples(path, images, **meta):
    """Write uint8 images [N, H, W, C] once (compressed) to the .npz `path` under `arr_0`, as guided-diffusion's
    evaluation suite and the paper's scripts read samples (docs/paper_notes.md §0); `meta` (λs, seed) as further
    keys. Raises ValueError for another dtype or shape."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples are uint8 [N, H, W, C]; got {images.dtype} {images.shape}")
    np.savez_compressed(path, arr_0=images, **meta)


def load_samples(path):
    """uint8 images [N, H, W, C] of a sample file: `arr_0` (save_samples) or `images` (the project's older files).
    Raises InputError when it holds neither or cannot be read (a cut-off or corrupt .npz: zip, zlib, pickle)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in ("arr_0", "images"):
                if key in f.files:
                    return f[key]
    except Exception as e:      # zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError
        raise InputError(f"cannot read samples from {path} ({type(e).__name__}: {' '.join(str(e).split())[:160]}); "
                         f"sample again") from None
    raise InputError(f"{path} holds no samples (no key arr_0 or images); pass a samples.npz of sample.py")


# ---------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def show_images(ax, images, nrow):
    """Draw uint8 images [N, H, W, C] as one grid on a matplotlib axis, pixel for pixel; C = 1 in grey 0..255."""
    grid = make_grid(images, nrow=nrow)
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.axis("off")


def density_axes(ax, xlabel, marks=(), log=False, legend_size=8):
    """Finish a density plot: each mark a dotted vertical line, log y if asked, axis labels, legend."""
    for m in marks:
        ax.axvline(m, color="k", ls=":", lw=1)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=legend_size)


def plot_histograms(named_values, path, xlabel, bins=100, log=False, span=(0, 1), marks=(0.2, 0.8)):
    """Overlaid density histograms (alpha 0.5), e.g. circle centre x/W of training data vs samples.
    span=None: the range of all values, widened to contain [0, 1] (no value is left out)."""
    plt = _pyplot()
    if span is None:
        every = np.concatenate([np.asarray(v, dtype=float) for v in named_values.values()] + [np.array([0.0, 1.0])])
        span = (float(every.min()), float(every.max()))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in named_values.items():
        if len(values):
            ax.hist(values, bins=bins, range=span, alpha=0.5, density=True, label=f"{name} (n={len(values)})")
    density_axes(ax, xlabel, marks, log)
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


def log_count_heatmap(p_x, p_y, bins=20):
    """[bins, bins] ln(count) (0 where empty) of the pairs (p_x, p_y) ∈ [0, 1]²; row = p_y bin, column = p_x
    bin, bin = int(min(p, 1 - 1e-6) · bins) (App. F, Fig. 9)."""
    ix = (np.minimum(np.asarray(p_x), 1 - 1e-6) * bins).astype(int)
    iy = (np.minimum(np.asarray(p_y), 1 - 1e-6) * bins).astype(int)
    counts = np.zeros((bins, bins))
    np.add.at(counts, (iy, ix), 1)
    return np.where(counts > 0, np.log(np.maximum(counts, 1)), 0.0)


def plot_log_heatmaps(named_maps, path, xlabel, ylabel):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(named_maps), figsize=(4.2 * len(named_maps), 3.8), squeeze=False)
    for ax, (name, m) in zip(axes[0], named_maps.items()):
        im = ax.imshow(m, origin="lower", extent=[0, 1, 0, 1], cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(im, ax=ax, label="ln(count)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_overview(unguided, guided, named_values, path, title=""):
    """One figure for people: unguided samples | guided samples | histogram of circle centres."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3), gridspec_kw=dict(width_ratios=[1, 1, 1.35]))
    for ax, (name, imgs) in zip(axes[:2], (("unguided", unguided), (title or "guided", guided))):
        show_images(ax, imgs[:64], nrow=8)
        ax.set_title(name, fontsize=10)
    ax = axes[2]
    for name, values in named_values.items():
        if len(values):
            ax.hist(values, bins=50, range=(0, 1), alpha=0.5, density=True, label=name)
    density_axes(ax, "circle centre x / W", marks=(0.2, 0.8))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report, folder, title, stem="report", device="cpu", amp=False):
    """<stem>.json (machine-readable) and <stem>.md (a table for people) in `folder`, with the host that produced
    them (device.host_info: CPU flags or GPU, AMP mode, torch version) added as "host"."""
    folder = Path(folder)
    clean = {k: v for k, v in report.items() if not isinstance(v, np.ndarray)}
    clean["host"] = host_info(device, amp)
    (folder / f"{stem}.json").write_text(json.dumps(clean, indent=2, default=float) + "\n")
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for k, v in clean.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif k == "host":
            v = host_line(v)
        lines.append(f"| {k} | {v} |")
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")


def host_line(host):
    """One line for people from a report's "host" (device.host_info)."""
    if not host:
        return "not recorded"
    flags = " ".join(host.get("cpu_flags", []))
    where = host.get("gpu") or f"{host.get('cpu')} [{flags}], {host.get('threads')} threads"
    return f"{where}, AMP {host.get('amp')}, torch {host.get('torch')}"


# ---------------------------------------------------------------------------------------------------
# Reports of a run: circles pictures, sample quality
# ---------------------------------------------------------------------------------------------------

def unguided_circles_report(samples):
    """What train.py reports on its unguided EMA samples of circles: one circle, one circle at a border."""
    m = circle_metrics(samples)
    return dict(samples=len(samples), one_circle=1 - m["invalid"],
                one_circle_at_border=float(((m["x"] < 0.2) | (m["x"] > 0.8)).sum() / len(samples)),
                in_middle=m["accuracy"], zero_circles=m["zero_circles"], multi_circles=m["multi_circles"],
                one_circle_any_size=1 - m["invalid_any_size"])


def circles_sample_report(samples, label, data_config, run, out, classifiers, device, which="main", seconds=0.0):
    """sample.py's numbers and pictures for circles: accuracy in the middle, 0 or 2+ circles (also counting blobs
    of any size), the centre histogram, the overview figure and the classifier heatmaps (`circles_pictures`)."""
    m = circle_metrics(samples)
    circles_pictures(samples, m["x"], label, data_config, run, out, classifiers, device, which)
    print(f"[sample] accuracy (one circle, centre x/W in [0.2, 0.8]) {m['accuracy'] * 100:.1f}% | "
          f"0 or 2+ circles {m['invalid'] * 100:.1f}% (blobs of any size: "
          f"{m['accuracy_any_size'] * 100:.1f}% | {m['invalid_any_size'] * 100:.1f}%) | {seconds:.0f}s", flush=True)
    return dict(accuracy_middle=m["accuracy"], zero_or_multi=m["invalid"], zero_circles=m["zero_circles"],
                multi_circles=m["multi_circles"], min_area=MIN_AREA, accuracy_any_size=m["accuracy_any_size"],
                zero_or_multi_any_size=m["invalid_any_size"])


def sizes_sample_report(samples, data_config, label, out):
    """sample.py's numbers for object sizes (App. K): radius in the unseen middle, larger than any training
    object, 0 or 2+ objects, and the histogram of normalised radii against the training data."""
    d = data_config
    m = size_metrics(samples, d["r_min"], d["r_max"])
    _, _, train_r = sizes_dataset(d["image_size"], d["r_min"], d["r_max"], d["delta"], seed=d["seed"])
    report = dict(accuracy_middle=m["accuracy"], zero_or_multi=m["invalid"],
                  larger_than_training=float((m["z"] > 1).sum() / len(samples)),
                  median_radius=float(np.median(m["radius"])) if len(m["radius"]) else None)
    plot_histograms({"training data": (train_r - d["r_min"]) / (d["r_max"] - d["r_min"]), label: m["z"]},
                    out / "histogram_size.png", "normalised radius (r - r_min) / (r_max - r_min)", bins=60, span=None)
    print(f"[sample] sizes: {m['accuracy'] * 100:.1f}% of samples have a radius in the unseen middle | "
          f"{report['larger_than_training'] * 100:.1f}% larger than any training object | "
          f"0 or 2+ objects {m['invalid'] * 100:.1f}%", flush=True)
    return report


def heatmap_classifiers(run, classifiers, which="main"):
    """{name: path} of the classifiers whose heatmaps to draw: the run's classifier and classifier_sn plus the
    guidance classifiers `classifiers` ([(name, path)]) (main), or every .pt in the run folder but the DDPM (all)."""
    stems = None if which == "all" else {"classifier", "classifier_sn"}
    paths = {p.stem: p for p in sorted(run.glob("*.pt")) if p.stem != "ddpm" and (stems is None or p.stem in stems)}
    paths.update({n: p for n, p in classifiers})
    return paths


def circles_pictures(samples, x, label, data_config, run, out, classifiers, device, which="main"):
    """Histogram of centres (train / unguided / these samples), overview figure, heatmaps of the classifiers."""
    d = data_config
    _, _, pos = circles_dataset(d["image_size"], d["radius"], d["delta"], seed=d["seed"])
    hists = {"training data": pos[:, 0] / d["image_size"]}
    unguided = run / "ddpm_samples.npz"
    if unguided.exists():
        unguided = load_samples(unguided)
        hists["unguided"] = circle_metrics(unguided)["x"]
    hists[label] = x
    plot_histograms(hists, out / "histogram_x.png", "circle centre x / W (single-circle samples)")
    if isinstance(unguided, np.ndarray):
        plot_overview(unguided, samples, hists, out / "overview.png", title=label)
    maps = {}
    for n, p in heatmap_classifiers(run, classifiers, which).items():
        try:
            clf, _ = ckpt_io.load_classifier(p, device)
        except InputError:
            continue
        maps[n], coords = classifier_heatmap(clf, d["image_size"], d["radius"], device=device)
    if maps:
        plot_heatmaps(maps, coords, out / "heatmaps.png", d["image_size"])
