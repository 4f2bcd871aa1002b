"""Sample quality and memorisation ([ZSI] App. H, I; Table S2): FID, precision / recall and nearest training images
of a run's samples, in named feature spaces, against named reference sets.

FID [Heusel et al. 2017]: the Fréchet distance between Gaussians fitted to two feature sets,
‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½). Precision / recall: the paper cites Sajjadi et al. (2018);
we compute the improved k-NN form of Kynkäänniemi et al. (2019, k = 3), the share of samples inside the union of
the reference features' k-NN balls, and of references inside the samples' (so Table S2's P / R may differ).
Feature spaces (every number names its own): raw pixels, the guidance classifier's penultimate features at t = 0,
and, with user-supplied weights, the FID Inception v3 pool3 features (appendix/inception.py): the standard FID of the paper.
Reference sets: every circle position (circles), the run's training set, or index files of CelebA train images
(App. I: `full`, 50k random train images; `mild`, the 10k with p(smile) nearest 0.5; evaluator.write_reference_sets).
"""
from pathlib import Path

import numpy as np
import torch

from infra import checkpoint as ckpt_io
from cli import InputError
from data import circles_dataset, load_data, to_float
from evaluate import _pyplot, show_images
from appendix.inception import inception_features, load_fid_inception


def _sqrt_psd(m):
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1^½ Σ2 Σ1^½)^½), the Fréchet distance of two Gaussians [FID]."""
    s1 = _sqrt_psd(np.asarray(sigma1, np.float64))
    cross = np.linalg.eigvalsh(s1 @ np.asarray(sigma2, np.float64) @ s1)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def fid(features_a, features_b):
    """FID between two feature sets [N, D] (any extractor: `feature_extractors`). With fewer samples than dimensions
    it works in the span of the centred features and of μ_a - μ_b: the same distance (every term is unchanged).
    NaN when a set has fewer than 2 features: its covariance (N - 1 in the denominator) is undefined (it was
    all NaN, and the eigendecomposition raised LinAlgError, e.g. in mnist_eval's report of a single sample)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if min(len(a), len(b)) < 2:
        return float("nan")
    if len(a) + len(b) < a.shape[1]:
        q = np.linalg.qr(np.concatenate([a - a.mean(0), b - b.mean(0), [a.mean(0) - b.mean(0)]]).T)[0]  # [D, N+1]
        a, b = a @ q, b @ q
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (a, b)]
    return frechet_distance(*stats[0], *stats[1])


def _pairwise_sq(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0)


def precision_recall(real, fake, k=3):
    """Improved precision / recall [Kynkäänniemi et al. 2019]: precision = fraction of fake features inside
    some real feature's k-NN ball, recall = fraction of real features inside some fake feature's ball."""
    def coverage(ref, query, rows=1024):        # blocks of rows: memory rows × len(ref), not len(ref)²
        radii = np.concatenate([np.partition(_pairwise_sq(ref[i:i + rows], ref), k, axis=1)[:, k]   # [:, 0]: itself
                                for i in range(0, len(ref), rows)])
        return float(np.concatenate([(_pairwise_sq(query[i:i + rows], ref) <= radii).any(1)
                                     for i in range(0, len(query), rows)]).mean())
    return coverage(real, fake), coverage(fake, real)


def cosine_nearest(queries, references, exclude_self=False, rows=1024):
    """(index, cosine distance) of each query's nearest reference (App. H memorisation check); exclude_self: query
    i may not match reference i (queries = references). Blocks of `rows` queries: memory rows × len(references)."""
    q = np.asarray(queries, np.float64)
    r = np.asarray(references, np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    idx, best = np.empty(len(q), dtype=np.int64), np.empty(len(q))
    for i in range(0, len(q), rows):
        dist = 1 - q[i:i + rows] @ r.T
        if exclude_self:
            block = np.arange(i, min(i + rows, len(q)))
            dist[block - i, block] = np.inf
        idx[i:i + rows] = dist.argmin(1)
        best[i:i + rows] = dist[np.arange(len(dist)), idx[i:i + rows]]
    return idx, best


def plot_nearest(samples, train_images, idx, dist, train_dist, path, n=16):
    """Closest sample/training pairs (top row samples, bottom row their nearest training images) and the
    distribution of sample->train vs train->train nearest-neighbour distances."""
    plt = _pyplot()
    order = np.argsort(dist)[:n]
    pairs = np.concatenate([samples[order], train_images[idx[order]]])
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw=dict(width_ratios=[1.6, 1]))
    show_images(axes[0], pairs, nrow=len(order))
    axes[0].set_title("closest samples (top) and their nearest training images (bottom)", fontsize=9)
    span = (0, max(dist.max(), train_dist.max()) * 1.05 + 1e-9)
    axes[1].hist(train_dist, bins=40, range=span, alpha=0.5, density=True, label="train -> nearest other train")
    axes[1].hist(dist, bins=40, range=span, alpha=0.5, density=True, label="sample -> nearest train")
    axes[1].set_xlabel("cosine distance")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quality_report(samples, train_images, references, extractors, out):
    """FID / precision / recall of the samples against each reference set ({name: (uint8 images, description)}: keys
    fid_<extractor>_<name>, fid_<extractor> for the name "") and the memorisation check against `train_images`, in
    every feature space of `extractors` ({name: (uint8 images -> [N, D] array, description)}).

    Writes nearest_<name>.png; returns a flat dict of numbers and descriptions (reference_<name>, extractor_<name>).
    """
    report = {f"reference_{ref}".rstrip("_"): text for ref, (_, text) in references.items()}
    for name, (features, description) in extractors.items():
        report[f"extractor_{name}"] = description
        f_samples, f_train = features(samples), features(train_images)
        for ref, (images, _) in references.items():
            f_ref, key = features(images), f"{name}_{ref}" if ref else name
            report[f"fid_{key}"] = fid(f_ref, f_samples)
            report[f"precision_{key}"], report[f"recall_{key}"] = precision_recall(f_ref, f_samples)
        idx, dist = cosine_nearest(f_samples, f_train)
        _, train_dist = cosine_nearest(f_train, f_train, exclude_self=True)
        report[f"nn_distance_median_{name}"] = float(np.median(dist))
        report[f"train_nn_distance_median_{name}"] = float(np.median(train_dist))
        report[f"nn_closer_than_any_train_pair_{name}"] = float((dist < train_dist.min()).mean())
        plot_nearest(samples, train_images, idx, dist, train_dist, Path(out) / f"nearest_{name}.png")
    return report


def feature_extractors(classifier_path, device, batch_size=256, inception=None):
    """{name: (uint8 images -> [N, D], description)}: raw pixels, the guidance classifier's penultimate features at
    t = 0 and, given `inception` = inception.load_fid_inception(...), the FID Inception's pool3 (standard FID)."""
    extractors = {"pixels": (lambda imgs: imgs.reshape(len(imgs), -1).astype(np.float32) / 127.5 - 1,
                             "raw pixels in [-1, 1], H·W·3-d (not the paper's Inception FID)")}
    if classifier_path is not None and Path(classifier_path).exists():
        clf, _ = ckpt_io.load_classifier(classifier_path, device)

        def clf_features(imgs):
            with torch.no_grad():
                return np.concatenate([clf.features(to_float(imgs[i:i + batch_size]).to(device),
                                                    torch.zeros(len(imgs[i:i + batch_size]), dtype=torch.long,
                                                                device=device)).cpu().numpy()
                                       for i in range(0, len(imgs), batch_size)])
        extractors["classifier"] = (clf_features, f"guidance classifier {classifier_path}, penultimate features, t = 0")
    if inception is not None:
        extractors["inception"] = (lambda imgs: inception_features(inception[0], imgs, device), inception[1])
    return extractors


def quality_inputs(references, inception_weights, data_config, device):
    """What sample.py --quality compares with, read before sampling (bad files fail first): dict(references={name:
    (uint8 images, description)} of each [NAME=]FILE, an index file of CelebA train-split positions as --subset
    (name: the file's stem unless given; App. I: full, mild), inception=load_fid_inception(...) or None)."""
    refs, d = {}, data_config
    for spec in references or []:
        name, _, file = ("", "", spec) if Path(spec).is_file() else spec.rpartition("=")
        name = name or Path(file).stem
        if not Path(file).is_file():
            raise InputError(f"--reference {spec}: {file!r} is not a file; give [NAME=]FILE, an index file of "
                             f"train-split positions (e.g. full=runs/smile/reference_Smiling_full_50000.txt)")
        if d["name"] != "celeba" or name in refs:
            raise InputError(f"--reference {spec}: " + (f"the name {name} is given twice" if name in refs else
                             f"index files select CelebA train images; this run has {d['name']} data"))
        images, _ = load_data(dict(d, split="train", subset=file, oversample=None))
        if len(images) < 4:
            raise InputError(f"--reference {spec} selects {len(images)} train images; precision / recall need 4+")
        refs[name] = (images, f"{file}: {len(images)} CelebA train images")
    return dict(references=refs, inception=load_fid_inception(inception_weights, device) if inception_weights else None)


def run_quality_report(samples, data_config, classifier_path, out, device, references=None, inception=None):
    """quality_report of a run's samples against `references` (quality_inputs) or, by default, every circle position
    (circles: the interpolation target) or the run's training set, in pixel, guidance-classifier and (given) FID
    Inception feature space (App. H, I)."""
    train_images, _ = load_data(data_config)
    d = data_config
    references = references or {"": (circles_dataset(d["image_size"], d["radius"], d["delta"], full_range=True)[0],
                                     "every circle position, x/W over [0, 1]") if d["name"] == "circles" else
                                (train_images, "the run's training set")}
    return quality_report(samples, train_images, references,
                          feature_extractors(classifier_path, device, inception=inception), out)
