"""The MNIST thickness experiment's evaluation: what the paper measures, on a factor measured exactly.

Per sample set (training extremes, held-out middle, unguided samples, the samples at hand), beyond/mnist.py's split:
  - stroke thickness (morpho.stroke_thickness, px): the share strictly inside the unseen band (thickest thin digit,
    thinnest thick digit), thinner / thicker than the band, and with no stroke at all; median and quartiles;
  - uniformity over the band ([ZSI] Sec. 5.1, App. B): KLD and "MSE" to uniform of the in-band thickness
    normalised to [0, 1] over the band, 100 bins (evaluate.uniformity_report, paper-exact and [0, 1] bins);
  - digit quality, so that guidance cannot win by drawing scribbles: a clean digit classifier (evaluator.EvalNet,
    10 classes, trained on real digits of every thickness and calibrated; `evaluator_digit.pt` in the run) gives
    each image's top probability: its mean, and the share called a digit at p >= 0.9; FID against the held-out
    middle in that classifier's penultimate features (App. I's FID in a domain feature space, not Inception's).
    The real middle digits' own numbers are the reference (their FID: one random half against the other).
Pictures: histogram_thickness.png (the sets overlaid, the band marked), by_thickness.png (samples in order of
thickness, NaN last).
"""
from pathlib import Path

import numpy as np
import torch

from infra import checkpoint as ckpt_io
from cli import InputError
from data import LABEL_UNDER_FLIP, check_classes, save_grid, to_float
from evaluate import load_samples, plot_histograms, uniformity_report, write_report
from appendix.evaluator import load_evaluator, predict_probs, train_evaluator
from beyond.mnist import digit_classifier_split, in_band, mnist_split
from beyond.morpho import stroke_thickness
from appendix.quality import fid

DIGIT_EVALUATOR = "evaluator_digit.pt"
CONFIDENT = 0.9        # "called a digit": the calibrated digit classifier's top probability at least this


def digit_evaluator_path(run):
    """<run>/evaluator_digit.pt; InputError (one line, the command that trains it) when it is missing."""
    path = Path(run) / DIGIT_EVALUATOR
    if not path.is_file():
        raise InputError(f"no digit classifier {path} to judge the samples; train it with `train.py --data mnist "
                         f"--what evaluator --out {run}` (--what all trains it too)")
    return path


def train_digit_evaluator(data_config, out, steps, width, seed, device):
    """Train and calibrate the 10-class digit classifier on real digits; writes <out>/evaluator_digit.pt and its
    report (validation accuracy, temperature, ECE)."""
    train_x, train_y, val_x, val_y = digit_classifier_split(data_config)
    check_classes(train_y, "the digit classifier")
    model, report = train_evaluator(train_x, train_y, val_x, val_y, steps=steps, width=width, seed=seed,
                                    device=device, flip=LABEL_UNDER_FLIP["mnist"], log=lambda m: print(m, flush=True))
    path = Path(out) / DIGIT_EVALUATOR
    config = dict(evaluator=dict(in_channels=1, width=width, num_classes=10), data=data_config, report=report)
    ckpt_io.save_atomic(dict(kind="evaluator", config=config, model=model.state_dict()), path)
    write_report(dict(report, seed=seed, train_digits=len(train_x), val_digits=len(val_x)), out,
                 f"Digit classifier {path.name}", stem=path.stem, device=device)
    print(f"[evaluator] digits: val accuracy {report['val_accuracy']:.4f} on {len(val_x)} digits, T = "
          f"{report['temperature']:.3f}: {path}", flush=True)


def thickness_stats(thickness, band):
    """dict(in_band, thinner, thicker, no_stroke: shares of all images; median, q25, q75 of the measured ones, px)."""
    t = np.asarray(thickness, dtype=np.float64)
    measured = t[~np.isnan(t)]
    q = np.percentile(measured, [25, 50, 75]) if len(measured) else [float("nan")] * 3
    return dict(in_band=float(in_band(t, band).mean()), thinner=float((t <= band[0]).mean()),
                thicker=float((t >= band[1]).mean()), no_stroke=float(np.isnan(t).mean()),
                median=float(q[1]), q25=float(q[0]), q75=float(q[2]))


def band_uniformity(thickness, band):
    """uniformity_report of the in-band thickness normalised to [0, 1] over the band ({} with fewer than 2)."""
    t = np.asarray(thickness, dtype=np.float64)
    z = (t[in_band(t, band)] - band[0]) / (band[1] - band[0])
    return uniformity_report(z) if len(z) >= 2 else {}


def unguided_report(samples, data_config):
    """What train.py reports on its unguided EMA samples of MNIST: thickness_stats against the band."""
    split = mnist_split(data_config)
    return dict(thickness_stats(stroke_thickness(samples[..., 0]), split["band"]), samples=len(samples),
                band_low=split["band"][0], band_high=split["band"][1])


def thickness_report(samples, data_config, run, out, label, device, seed=0):
    """sample.py's numbers and pictures for MNIST (module docstring). Keys: <metric>_<set> with set in training,
    middle, unguided (train.py's ddpm_samples.npz, when there) and samples; band_low / band_high (px)."""
    split = mnist_split(data_config)
    band = split["band"]
    model, _ = load_evaluator(digit_evaluator_path(run), device)
    features = lambda imgs: _features(model, imgs, device)
    sets = {"training": (split["images"], split["thickness"][split["split"] >= 0]),
            "middle": (split["mild"], split["mild_thickness"])}
    if (Path(run) / "ddpm_samples.npz").exists() and label != "unguided":
        unguided = load_samples(Path(run) / "ddpm_samples.npz")
        sets["unguided"] = (unguided, stroke_thickness(unguided[..., 0]))
    sets["samples"] = (samples, stroke_thickness(samples[..., 0]))
    mild = features(split["mild"])
    halves = np.random.default_rng(seed).permutation(len(mild))
    report = dict(band_low=band[0], band_high=band[1], source=split["source"], digit_threshold=CONFIDENT)
    for name, (images, t) in sets.items():
        top = predict_probs(model, images, device=device).max(1).values.numpy()
        fid_mild = (fid(mild[halves[::2]], mild[halves[1::2]]) if name == "middle" else fid(mild, features(images)))
        values = dict(thickness_stats(t, band), **band_uniformity(t, band), digit_confidence=float(top.mean()),
                      digit_confident=float((top >= CONFIDENT).mean()), fid_middle=fid_mild, n=len(images))
        report.update({f"{k}_{name}": v for k, v in values.items()})
    plot_histograms({"training (thin + thick)": sets["training"][1], "held-out middle": sets["middle"][1],
                     **({"unguided": _measured(sets["unguided"][1])} if "unguided" in sets else {}),
                     label: _measured(sets["samples"][1])}, Path(out) / "histogram_thickness.png",
                    "stroke thickness (px)", bins=80, span=None, marks=band)
    order = np.argsort(np.nan_to_num(sets["samples"][1], nan=np.inf), kind="stable")
    pick = order[np.linspace(0, len(order) - 1, min(100, len(order))).round().astype(int)]
    save_grid(samples[pick], Path(out) / "by_thickness.png", nrow=10, scale=3)
    r = report
    print(f"[sample] mnist: {r['in_band_samples'] * 100:.1f}% in the unseen band ({band[0]:.2f}, {band[1]:.2f}) px"
          + (f" (unguided {r['in_band_unguided'] * 100:.1f}%)" if "unguided" in sets else "")
          + f" | thinner {r['thinner_samples'] * 100:.1f}%, thicker {r['thicker_samples'] * 100:.1f}%, no stroke "
          f"{r['no_stroke_samples'] * 100:.1f}% | called a digit {r['digit_confident_samples'] * 100:.1f}% (real "
          f"middle {r['digit_confident_middle'] * 100:.1f}%) | FID to the middle {r['fid_middle_samples']:.2f} "
          f"(real halves {r['fid_middle_middle']:.2f})", flush=True)
    return report


def _measured(t):
    return t[~np.isnan(t)]


def _features(model, images, device, size=256):
    """The digit classifier's penultimate features [N, D] (numpy) of uint8 images [N, H, W, 1]."""
    with torch.no_grad():
        return np.concatenate([model.features(to_float(images[i:i + size]).to(device)).cpu().numpy()
                               for i in range(0, len(images), size)])
