"""The evaluation classifier and the extreme-subset filter of [ZSI] App. D: classifiers of *clean* images.

Evaluation classifier (the attribute proxy z of Sec. 5; docs/paper_notes.md §5.1): `EvalNet`, a compact
ResNet, trained with cross-entropy (AdamW, horizontal flips) on the train split, the checkpoint with the best
validation accuracy kept, then temperature-scaled on the validation split (classifier.calibrate; 15-bin ECE
before/after stored with it). It scores samples: p(attribute | x) (`attribute_report`: Fig. 4, 8, 9).

Extreme subsets (App. D; docs/paper_notes.md §15), following the paper where the official code deviates
(docs/paper_notes.md §16.16):
  1. τ1: a classifier trained on the whole train split; keep the examples it classifies confidently *and*
     in agreement with the label, p(y_i | x_i) > τ1.
  2. τ2: an ensemble of 5 classifiers, each trained on a disjoint random fifth of the stage-1 set; keep the
     stage-1 examples for which every member agrees with the label with p > τ2 (the official code applied it
     to the whole train split, and for Young/hair dropped the label check: we keep both of the paper's rules).
  3. top-k: rank the survivors by the evaluation classifier's p(class 1) and keep the k lowest of class 0
     and the k highest of class 1, i.e. the k most extreme per side (the official Old/blond sides sorted
     the wrong way round). Several sizes are nested: the 5k set is inside the 10k set, and so on.
`train.py --what evaluator` and `--what filter` call `train_evaluator_run` and `filter_run`.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint as ckpt_io
from classifier import calibrate
from cli import InputError
from data import Batches, celeba_split, load_data, load_images, save_grid, to_float
from evaluate import log_count_heatmap, plot_histograms, plot_log_heatmaps, uniformity_report, write_report
from unet import normalization


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with GroupNorm and SiLU, a residual (1×1 strided projection when shapes change)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), normalization(cout), nn.SiLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), normalization(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        return F.silu(self.body(x) + self.skip(x))


@dataclass
class EvalConfig:
    """A compact ResNet for clean images: the attribute proxy z of [ZSI] Sec. 5 (the paper used an
    EfficientNetV2-S from torchvision, which this project does not depend on)."""
    in_channels: int = 3
    width: int = 32
    stages: int = 4                          # resolution halves after the stem and each stage but the last
    num_classes: int = 2
    dropout: float = 0.2

    def build(self):
        return EvalNet(**asdict(self))


class EvalNet(nn.Module):
    """Stem conv, `stages` residual stages (width doubling, resolution halving), mean pool, dropout, linear;
    logits divided by the stored temperature."""

    def __init__(self, in_channels=3, width=32, stages=4, num_classes=2, dropout=0.2):
        super().__init__()
        chans = [width * 2 ** i for i in range(stages)]
        layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), normalization(width), nn.SiLU()]
        cin = width
        for i, c in enumerate(chans):
            layers.append(BasicBlock(cin, c, stride=1 if i == 0 else 2))
            cin = c
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))
        self.register_buffer("temperature", torch.ones(()))

    def features(self, x, t=None):
        """Penultimate features [N, channels] (t is ignored: clean images)."""
        return self.trunk(x).mean(dim=(2, 3)).float()

    def forward(self, x, t=None):
        """Logits / T of clean images x in [-1, 1]."""
        return self.head(self.features(x)) / self.temperature



def predict_probs(model, images, batch_size=256, device="cpu"):
    """softmax(model(x)) [N, K] for uint8 images [N, H, W, C]."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(model(to_float(images[i:i + batch_size]).to(device)).softmax(1).float().cpu())
    return torch.cat(out)


def _logits(model, images, batch_size=256, device="cpu"):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(to_float(images[i:i + batch_size]).to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])


def train_clean_classifier(images, labels, val_images, val_labels, steps=2000, batch_size=64, lr=1e-3,
                           width=32, seed=0, eval_every=250, device="cpu", log=print):
    """An EvalNet trained on (images, labels), the step with the best validation accuracy kept.

    Returns (model in eval mode, dict(val_accuracy, step)).
    """
    torch.manual_seed(seed)
    k = max(2, int(max(labels.max(), val_labels.max())) + 1)
    model = EvalConfig(width=width, num_classes=k).build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    batches = Batches(images, labels, batch_size, flip=True, seed=seed)
    best = (-1.0, 0, None)
    for step in range(1, steps + 1):
        model.train()
        x, y = next(batches)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            acc = float((_logits(model, val_images, device=device).argmax(1) == torch.as_tensor(val_labels)).float().mean())
            if acc > best[0]:
                best = (acc, step, {k_: v.detach().clone() for k_, v in model.state_dict().items()})
            log(f"[evaluator] step {step}/{steps} loss {float(loss.detach()):.4f} val acc {acc:.4f} "
                f"(best {best[0]:.4f} at {best[1]})")
    model.load_state_dict(best[2])
    return model.eval(), dict(val_accuracy=best[0], step=best[1])


def train_evaluator(images, labels, val_images, val_labels, **kwargs):
    """train_clean_classifier + temperature scaling on the validation split. Returns (model, report)."""
    model, report = train_clean_classifier(images, labels, val_images, val_labels, **kwargs)
    logits = _logits(model, val_images, device=kwargs.get("device", "cpu"))
    report.update(calibrate(model, logits, torch.as_tensor(val_labels)))
    return model, report


def confident_agreement(probs, labels, tau):
    """Mask of examples whose probability of their own label exceeds τ."""
    return probs[torch.arange(len(labels)), torch.as_tensor(labels)].numpy() > tau


def top_k_extremes(p1, labels, k):
    """Indices of the k lowest-p(class 1) examples of class 0 and the k highest of class 1 (sorted)."""
    idx0, idx1 = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    low = idx0[np.argsort(p1[idx0], kind="stable")[:k]]
    high = idx1[np.argsort(-p1[idx1], kind="stable")[:k]]
    return np.sort(np.concatenate([low, high]))


def extreme_filter(images, labels, val_images, val_labels, evaluator, sizes, tau1=0.95, tau2=0.9999,
                   members=5, seed=0, device="cpu", log=print, **train_kwargs):
    """App. D: returns dict(indices={size: sorted train positions}, counts, p1 of the kept examples)."""
    counts = dict(train=len(labels))
    stage1_model, _ = train_clean_classifier(images, labels, val_images, val_labels, seed=seed, device=device,
                                             log=log, **train_kwargs)
    keep = confident_agreement(predict_probs(stage1_model, images, device=device), labels, tau1)
    counts["stage1_tau1"] = int(keep.sum())
    log(f"[filter] stage 1 (τ1 = {tau1}): kept {keep.sum()} of {len(labels)}")
    stage1 = np.flatnonzero(keep)
    folds = np.array_split(np.random.default_rng(seed).permutation(stage1), members)
    agree = np.ones(len(stage1), dtype=bool)
    for m, fold in enumerate(folds):
        member, _ = train_clean_classifier(images[fold], labels[fold], val_images, val_labels, seed=seed + 1 + m,
                                           device=device, log=log, **train_kwargs)
        agree &= confident_agreement(predict_probs(member, images[stage1], device=device), labels[stage1], tau2)
    stage2 = stage1[agree]
    counts["stage2_ensemble_tau2"] = int(len(stage2))
    log(f"[filter] stage 2 ({members} members, τ2 = {tau2}): kept {len(stage2)}")
    p1 = predict_probs(evaluator, images[stage2], device=device)[:, 1].numpy()
    indices = {}
    for size in sorted(sizes, reverse=True):
        k = size // 2
        available = min((labels[stage2] == 0).sum(), (labels[stage2] == 1).sum())
        if k > available:
            log(f"[filter] size {size}: only {available} per side survive; keeping {available} per side")
            k = int(available)
        indices[size] = stage2[top_k_extremes(p1, labels[stage2], k)]
        counts[f"top_k_{size}"] = int(len(indices[size]))
    return dict(indices=indices, counts=counts, p1=p1, stage2=stage2)


# ---------------------------------------------------------------------------------------------------
# Files: evaluator checkpoints, the two train.py commands, scoring samples
# ---------------------------------------------------------------------------------------------------

def load_evaluator(path, device="cpu"):
    """(evaluation classifier in eval mode with its temperature, config) from an evaluator checkpoint."""
    ckpt = ckpt_io.load(path)
    if ckpt.get("kind") != "evaluator":
        raise InputError(f"{path} is a {ckpt.get('kind')} checkpoint, not an evaluation classifier")
    model = EvalConfig(**ckpt["config"]["evaluator"]).build()
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


def evaluator_path(out, data_config):
    """<run>/evaluator_<attr>.pt (two attributes: evaluator_<a>-<b>.pt)."""
    return Path(out) / f"evaluator_{'-'.join(a.replace('/', '_') for a in data_config['attrs'])}.pt"


def celeba_splits(data_config):
    """Full train split (no --subset) and the valid split, as (images, labels, positions) each."""
    out = []
    for split in ("train", "valid"):
        paths, labels, _, _, positions = celeba_split(data_config["path"], data_config["attrs"], split)
        out.append((load_images(paths, data_config["image_size"]), labels, positions))
    return out


def train_evaluator_run(data_config, out, steps, width, seed, device):
    """Train, select and calibrate the evaluation classifier of the run's attribute; writes evaluator_<attr>.pt
    and its report."""
    (train_x, train_y, _), (val_x, val_y, _) = celeba_splits(data_config)
    model, report = train_evaluator(train_x, train_y, val_x, val_y, steps=steps, width=width, seed=seed,
                                    device=device, log=lambda m: print(m, flush=True))
    path = evaluator_path(out, data_config)
    config = dict(evaluator=dict(width=width, num_classes=model.head[1].out_features), data=data_config,
                  report=report)
    ckpt_io.save_atomic(dict(kind="evaluator", config=config, model=model.state_dict()), path)
    write_report(dict(report, seed=seed), out, f"Evaluation classifier {path.name}", stem=path.stem, device=device)
    print(f"[evaluator] val accuracy {report['val_accuracy']:.4f}, T = {report['temperature']:.3f}, ECE "
          f"{report['ece_before']:.4f} -> {report['ece_after']:.4f}: {path}", flush=True)


def filter_run(data_config, out, sizes, tau1, tau2, members, steps, width, seed, device):
    """App. D: τ1 classifier, τ2 ensemble, top-k by the evaluation classifier; writes subset_<attr>_<size>.txt."""
    path = evaluator_path(out, data_config)
    if not path.exists():
        raise InputError(f"{path} is missing: train the evaluation classifier first with --what evaluator")
    evaluator, _ = load_evaluator(path, device)
    (train_x, train_y, positions), (val_x, val_y, _) = celeba_splits(data_config)
    if train_y.max() > 1:
        raise InputError("--what filter works on one (binary) attribute; intersect index files for two")
    result = extreme_filter(train_x, train_y, val_x, val_y, evaluator, sizes, tau1=tau1, tau2=tau2,
                            members=members, seed=seed, device=device, log=lambda m: print(m, flush=True),
                            steps=steps, width=width)
    stem = path.stem.replace("evaluator_", "subset_")
    for size, idx in result["indices"].items():
        (out / f"{stem}_{size}.txt").write_text("".join(f"{p}\n" for p in positions[idx]))
    kept = {f"{size} kept": result["p1"][np.isin(result["stage2"], idx)] for size, idx in result["indices"].items()}
    plot_histograms(kept, out / f"{stem}_scores.png", "evaluation classifier p(class 1)", log=True, marks=())
    write_report(dict(result["counts"], tau1=tau1, tau2=tau2, members=members, seed=seed), out,
                 f"Extreme-subset filter (App. D) for {data_config['attrs']}", stem=f"{stem}_report", device=device)
    print(f"[filter] counts {result['counts']} -> {out}/{stem}_<size>.txt", flush=True)


def evaluator_paths(evaluators, data_config, run):
    """The evaluation classifiers that score samples: `evaluators` (--evaluator), else the run's
    evaluator_<attr>.pt files (two attributes: one evaluator per attribute, or none)."""
    if evaluators:
        return [Path(p) for p in evaluators]
    if data_config["name"] != "celeba":
        return []
    attrs = [a.replace("/", "_") for a in data_config["attrs"]]
    joined = run / f"evaluator_{'-'.join(attrs)}.pt"
    paths = [joined] if len(attrs) == 1 else [run / f"evaluator_{a}.pt" for a in attrs]
    return [p for p in paths if p.exists()] if len(attrs) == 1 else (paths if all(p.exists() for p in paths) else [])


def attribute_report(samples, evaluators, data_config, run, out, label, device):
    """Scores of the samples by the evaluation classifier(s): the 100-bin histogram (log y) against the
    training data and unguided samples, KLD / "MSE" to uniform (paper-exact and [0, 1] bins), the samples
    with p in [0.49, 0.51] (Fig. 4, 8); with two evaluators the 20x20 ln-count heatmap (Fig. 9)."""
    models = [load_evaluator(p, device)[0] for p in evaluators]
    score = lambda imgs: [predict_probs(m, imgs, device=device)[:, 1].numpy() for m in models]
    train_images, _ = load_data(data_config)
    sets = {"training data": train_images}
    if (run / "ddpm_samples.npz").exists() and label != "unguided":
        sets["unguided"] = np.load(run / "ddpm_samples.npz")["images"]
    sets[label] = samples
    scores = {name: score(imgs) for name, imgs in sets.items()}
    report = {}
    for name, p in scores.items():
        key = name.replace(" ", "_")
        report.update({f"{k}_{key}": v for k, v in uniformity_report(p[0]).items()})
    p = scores[label][0]
    plot_histograms({n: v[0] for n, v in scores.items()}, out / "histogram_p.png",
                    f"evaluation classifier p(class 1) ({evaluators[0].stem})", log=True, marks=(0.5,))
    mild = samples[(p >= 0.49) & (p <= 0.51)]
    report["mild_049_051"] = int(len(mild))
    if len(mild):
        save_grid(mild[:100], out / "mild_049_051.png", nrow=10)
    if len(models) == 2:
        maps = {n: log_count_heatmap(v[0], v[1]) for n, v in scores.items() if n != "training data"}
        plot_log_heatmaps(maps, out / "heatmap_2d.png", f"p ({evaluators[0].stem})", f"p ({evaluators[1].stem})")
    return report
