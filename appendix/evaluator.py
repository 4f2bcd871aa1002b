"""The evaluation classifier and the extreme-subset filter of [ZSI] App. D: classifiers of *clean* images.

Evaluation classifier (the attribute proxy z of Sec. 5; docs/paper_notes.md §5.1): `EvalNet`, a compact
ResNet, trained with cross-entropy (AdamW, horizontal flips) on the train split, the checkpoint with the best
validation accuracy kept, then temperature-scaled on the validation split (classifier.calibrate; 15-bin ECE
before/after stored with it). It scores samples: p(attribute | x) (`attribute_report`: Fig. 4, 8, 9).

Extreme subsets (App. D; docs/paper_notes.md §15), following the paper where the official code deviates
(docs/paper_notes.md §16.16):
  1. τ1: a classifier trained on the whole train split; keep the examples it classifies confidently *and*
     in agreement with the label, p(y_i | x_i) > τ1. For Young the paper used a pretrained face model, FaRL
     (Sec. 4.3), which is not available offline: there the calibrated evaluation classifier scores stage 1
     (`--stage1`, `stage1_kind`), a model of the same CelebA labels, not an independent one.
  2. τ2: an ensemble of 5 classifiers, each trained on a disjoint random fifth of the stage-1 set; keep the
     stage-1 examples for which every member agrees with the label with p > τ2 (the official code applied it
     to the whole train split, and for Young/hair dropped the label check: we keep both of the paper's rules).
  3. top-k: rank the survivors by the evaluation classifier's p(class 1) and keep the k0 lowest of class 0
     and the k1 highest of class 1, the most extreme per side (the official Old/blond sides sorted the wrong
     way round): k0 = k1 = size/2 for the nested sizes of Sec. 5.2 (`--train-size`; the 5k set is inside the
     10k set, and so on), or k per class (`--top-k`: Young keeps the 7k oldest and the 15k youngest, Sec. 5.4).
  Two attributes (App. F): each attribute is filtered on its own and the 4-class set is the intersection.
`train.py --what evaluator` and `--what filter` call `train_evaluator_run` and `filter_run`; sample.py finds the
evaluator of a run with `evaluator_paths` (the run folder, or the folder of its subset file).
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from infra import checkpoint as ckpt_io
from classifier import calibrate
from cli import InputError, parse_ints
from data import LABEL_UNDER_FLIP, Batches, celeba_split, check_classes, load_data, load_images, save_grid, to_float
from evaluate import (load_samples, log_count_heatmap, plot_histograms, plot_log_heatmaps, uniformity_report,
                      write_report)
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
                           width=32, seed=0, eval_every=250, device="cpu", log=print, flip=LABEL_UNDER_FLIP["celeba"]):
    """An EvalNet trained on (images uint8 [N, H, W, C], labels), the step with the best validation accuracy kept;
    flip: Batches' flip mode, by default CelebA's (random horizontal flips that keep the label; digits pass
    LABEL_UNDER_FLIP["mnist"], None: a mirrored digit is no digit).

    Returns (model in eval mode, dict(val_accuracy, step)).
    """
    torch.manual_seed(seed)
    k = max(2, int(max(labels.max(), val_labels.max())) + 1)
    model = EvalConfig(in_channels=images.shape[-1], width=width, num_classes=k).build().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    batches = Batches(images, labels, batch_size, flip=flip, seed=seed)
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


DEFAULT_TRAIN_SIZES = "60000,30000,10000,5000"    # the nested subsets of Table 1 ([ZSI] Sec. 5.2)


def confident_agreement(probs, labels, tau):
    """Mask [N] of the examples whose probability of their own label exceeds τ: probs [N, K], labels [N]."""
    return probs[torch.arange(len(labels)), torch.as_tensor(labels)].numpy() > tau


def top_k_extremes(p1, labels, k):
    """Sorted indices of the k0 lowest-p(class 1) examples of class 0 and the k1 highest of class 1.

    p1 [N] the evaluation classifier's p(class 1), labels [N] in {0, 1}; k an int (k0 = k1 = k, the paper's
    symmetric top-k) or a pair (k0, k1) (the Young set of [ZSI] Sec. 5.4: the 7k oldest and the 15k youngest).
    Equal scores keep their order (a stable sort).
    """
    k0, k1 = (k, k) if np.isscalar(k) else k
    idx0, idx1 = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    low = idx0[np.argsort(p1[idx0], kind="stable")[:k0]]
    high = idx1[np.argsort(-p1[idx1], kind="stable")[:k1]]
    return np.sort(np.concatenate([low, high]))


def selection_name(selection):
    """File-name part of a top-k selection: a size 60000 -> "60000" (30000 per side); a pair (7000, 15000) ->
    "k7000-15000" (k of label 0, then of label 1), so no per-class file can be mistaken for a symmetric one."""
    return f"k{selection[0]}-{selection[1]}" if isinstance(selection, tuple) else str(selection)


def filter_targets(train_size, top_k, num_attrs):
    """The top-k selections of `train.py --what filter`, one list per attribute of --attr.

    train_size: "60000,30000" (--train-size; default DEFAULT_TRAIN_SIZES): sizes, k = size // 2 per side,
    nested, the same sizes for every attribute. top_k: "7000,15000" (--top-k): k of label 0 then of label 1,
    two values per attribute in --attr order (two attributes: "30000,30000,15000,15000", App. F).
    Returns e.g. [[60000, 30000]] or [[(30000, 30000)], [(15000, 15000)]].
    Raises InputError (one line): both flags, a wrong count, a k below 1 or a size below 2.
    """
    if train_size is not None and top_k is not None:
        raise InputError("--train-size (k = size/2 per side) and --top-k (k per class) both choose the top-k: "
                         "pass one of them")
    if top_k is None:
        sizes = parse_ints(train_size or DEFAULT_TRAIN_SIZES, "--train-size")
        if min(sizes) < 2:
            raise InputError(f"--train-size takes subset sizes >= 2 (k = size/2 per side), got {train_size}")
        return [list(sizes) for _ in range(num_attrs)]
    ks = parse_ints(top_k, "--top-k")
    if len(ks) != 2 * num_attrs:
        raise InputError(f"--top-k {top_k} has {len(ks)} value(s); give the k of label 0 then of label 1"
                         + (" for each attribute in --attr order, e.g. --top-k 30000,30000,15000,15000"
                            if num_attrs == 2 else ", e.g. --top-k 7000,15000"))
    if min(ks) < 1:
        raise InputError(f"--top-k {top_k}: every k must be a positive integer")
    return [[(ks[2 * i], ks[2 * i + 1])] for i in range(num_attrs)]


def extreme_filter(images, labels, val_images, val_labels, evaluator, sizes, tau1=0.95, tau2=0.9999,
                   members=5, seed=0, device="cpu", log=print, stage1=None, **train_kwargs):
    """App. D on one binary attribute: stage 1 (τ1), the ensemble (τ2), then top-k by the evaluation classifier.

    images uint8 [N, H, W, 3] and labels [N] in {0, 1}: the train split; val_images, val_labels: the valid split
    (each trained classifier keeps its best validation step); evaluator: the evaluation classifier, whose
    p(class 1) ranks the survivors. sizes: selections, each an int size (k = size // 2 per side, capped at the
    smaller side with a log line) or a pair (k0, k1) (exactly k0 of class 0 and k1 of class 1).
    stage1: None trains a classifier on all N examples (the paper's stage, [ZSI] App. D.1); or a scorer
    images uint8 [M, H, W, 3] -> probabilities [M, 2] (a pretrained model: FaRL for Young in the paper,
    [ZSI] Sec. 4.3). **train_kwargs go to train_clean_classifier (steps, width, ...).
    Returns dict(indices={selection: sorted positions into images}, short={pair: (n0, n1) survivors} for the
    pairs asking for more than survive (no indices for them), counts, p1 [S] of the S stage-2 survivors,
    stage2 [S] their sorted positions, survivors (n0, n1)).
    """
    counts = dict(train=len(labels))
    if stage1 is None:
        stage1_model, _ = train_clean_classifier(images, labels, val_images, val_labels, seed=seed, device=device,
                                                 log=log, **train_kwargs)
        probs = predict_probs(stage1_model, images, device=device)
    else:
        probs = stage1(images)
    keep = confident_agreement(probs, labels, tau1)
    counts["stage1_tau1"] = int(keep.sum())
    log(f"[filter] stage 1 (τ1 = {tau1}): kept {keep.sum()} of {len(labels)}")
    stage1_idx = np.flatnonzero(keep)
    if len(stage1_idx) < members:
        raise InputError(f"stage 1 (τ1 = {tau1}) kept {len(stage1_idx)} of {len(labels)} images, fewer than the "
                         f"{members} ensemble members need (one fold each): lower --tau1 or --members")
    folds = np.array_split(np.random.default_rng(seed).permutation(stage1_idx), members)
    agree = np.ones(len(stage1_idx), dtype=bool)
    for m, fold in enumerate(folds):
        member, _ = train_clean_classifier(images[fold], labels[fold], val_images, val_labels, seed=seed + 1 + m,
                                           device=device, log=log, **train_kwargs)
        agree &= confident_agreement(predict_probs(member, images[stage1_idx], device=device), labels[stage1_idx],
                                     tau2)
    stage2 = stage1_idx[agree]
    counts["stage2_ensemble_tau2"] = int(len(stage2))
    log(f"[filter] stage 2 ({members} members, τ2 = {tau2}): kept {len(stage2)}")
    p1 = predict_probs(evaluator, images[stage2], device=device)[:, 1].numpy()
    y2 = labels[stage2]
    n0, n1 = int((y2 == 0).sum()), int((y2 == 1).sum())
    indices, short = {}, {}
    for sel in sorted(sizes, key=lambda s: sum(s) if isinstance(s, tuple) else s, reverse=True):
        if isinstance(sel, tuple):
            if sel[0] > n0 or sel[1] > n1:
                log(f"[filter] top-k {sel[0]},{sel[1]}: only {n0} of class 0 and {n1} of class 1 survive")
                short[sel] = (n0, n1)
                continue
            k = sel
        else:
            k = sel // 2
            available = min(n0, n1)
            if k > available:
                log(f"[filter] size {sel}: only {available} per side survive; keeping {available} per side")
                k = available
        indices[sel] = stage2[top_k_extremes(p1, y2, k)]
        counts[f"top_k_{selection_name(sel)}"] = int(len(indices[sel]))
    return dict(indices=indices, short=short, counts=counts, p1=p1, stage2=stage2, survivors=(n0, n1))


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
        if split == "train":        # before reading any image
            check_classes(labels, f"the classifier of {','.join(data_config['attrs'])} (evaluator, App. D filter)")
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


def stage1_kind(attr, mode):
    """The stage-1 model of the App. D filter for `attr` under `train.py --stage1 mode`: "trained" (a classifier
    trained on the whole train split, [ZSI] App. D.1) or "evaluator" (the calibrated evaluation classifier).
    auto follows the paper ([ZSI] Sec. 4.3): a pretrained face model for Young, a trained classifier for the
    others. The paper's face model (FaRL) is not available offline: the evaluation classifier stands in for it,
    a classifier of the same CelebA labels rather than an independent model of age (the official threshold on
    FaRL's p(Young) was 0.9: `--tau1 0.9`)."""
    return mode if mode != "auto" else "evaluator" if attr == "Young" else "trained"


def class_names(attrs):
    """Names of the classes of data.celeba_labels: ["Smiling", "not Smiling"] or, for two attributes, the 4-class
    order of App. F, e.g. ["Smiling & Black_Hair", "Smiling & Blond_Hair", "not Smiling & Black_Hair", ...]."""
    sides = [(a.split("/")[0], a.split("/")[1] if "/" in a else f"not {a}") for a in attrs]
    if len(sides) == 1:
        return [sides[0][1], sides[0][0]]
    (a1, a0), (b1, b0) = sides
    return [f"{a1} & {b1}", f"{a1} & {b0}", f"{a0} & {b1}", f"{a0} & {b0}"]


def write_reference_sets(p1, positions, out, stem, seed, mild=10_000, full=50_000):
    """The two reference sets of App. I (Table S2) for `sample.py --quality --reference`, as index files of train-
    split positions: <stem>_mild_<n>.txt, the `mild` train images whose evaluation-classifier p(class 1) is closest
    to 0.5 (ℓ1), and <stem>_full_<n>.txt, `full` random train images (fewer where the split is smaller).
    p1: [N] scores of the train split, positions: [N] its positions in the release."""
    order = np.argsort(np.abs(p1 - 0.5), kind="stable")[:mild]
    picks = {"mild": np.sort(order), "full": np.sort(np.random.default_rng(seed).permutation(len(p1))[:full])}
    for name, idx in picks.items():
        (out / f"{stem}_{name}_{len(idx)}.txt").write_text("".join(f"{p}\n" for p in positions[idx]))
    return {name: positions[idx] for name, idx in picks.items()}


def _filter_attribute(data_config, out, selections, stage1, tau1, tau2, members, steps, width, seed, device):
    """extreme_filter on one attribute with its evaluator_<attr>.pt in `out`; writes subset_<attr>_<name>.txt per
    selection, subset_<attr>_stage2.txt (the ensemble's survivors, D* of App. D.1), the score histogram and the
    report. Returns ({selection: sorted train-split positions}, {selection: survivors (n0, n1)} too few)."""
    attr, log = data_config["attrs"][0], lambda m: print(m, flush=True)
    path = evaluator_path(out, data_config)
    evaluator, _ = load_evaluator(path, device)
    (train_x, train_y, positions), (val_x, val_y, _) = celeba_splits(data_config)
    kind = stage1_kind(attr, stage1)
    scorer = None if kind == "trained" else lambda images: predict_probs(evaluator, images, device=device)
    log(f"[filter] {attr}: stage 1 by the {'evaluation classifier ' + path.name if scorer else 'trained classifier'}")
    result = extreme_filter(train_x, train_y, val_x, val_y, evaluator, selections, tau1=tau1, tau2=tau2,
                            members=members, seed=seed, device=device, log=log, stage1=scorer, steps=steps,
                            width=width)
    stem = path.stem.replace("evaluator_", "subset_")
    kept = {sel: positions[idx] for sel, idx in result["indices"].items()}
    for sel, pos in kept.items():
        (out / f"{stem}_{selection_name(sel)}.txt").write_text("".join(f"{p}\n" for p in pos))
    (out / f"{stem}_stage2.txt").write_text("".join(f"{p}\n" for p in positions[result["stage2"]]))
    write_reference_sets(predict_probs(evaluator, train_x, device=device)[:, 1].numpy(), positions, out,
                         stem.replace("subset_", "reference_"), seed)
    scores = {f"{selection_name(sel)} kept": result["p1"][np.isin(result["stage2"], idx)]
              for sel, idx in result["indices"].items()}
    plot_histograms(scores, out / f"{stem}_scores.png", "evaluation classifier p(class 1)", log=True, marks=())
    n0, n1 = result["survivors"]
    write_report(dict(result["counts"], stage2_class0=n0, stage2_class1=n1, stage1=kind, tau1=tau1, tau2=tau2,
                      members=members, seed=seed, short=", ".join(selection_name(s) for s in result["short"])),
                 out, f"Extreme-subset filter (App. D) for {attr}", stem=f"{stem}_report", device=device)
    log(f"[filter] {attr}: counts {result['counts']} -> {out}/{stem}_*.txt")
    return kept, result["short"]


def filter_run(data_config, out, targets, tau1, tau2, members, steps, width, seed, device, stage1="auto"):
    """App. D for the run's attribute(s): stage 1 (--stage1, see stage1_kind), the τ2 ensemble, top-k by the
    evaluation classifier evaluator_<attr>.pt in `out`; writes subset_<attr>_<name>.txt (selection_name).

    targets: filter_targets' lists, one per attribute. Two attributes (App. F): each attribute is filtered on its
    own, exactly as a one-attribute run with the same flags (its files are written too), and the 4-class
    training set is the intersection of their i-th selections, subset_<a>-<b>_<name>.txt, whose labels are
    data.celeba_labels' (class_names); its size and class counts go to subset_<a>-<b>_report.json.
    Raises InputError before any training when an evaluator is missing or a --top-k k exceeds the class in the
    train split, and after filtering (the survivors and reports written) when fewer examples survive than asked.
    """
    attrs = data_config["attrs"]
    singles = [dict(data_config, attrs=[a]) for a in attrs]
    for d, selections in zip(singles, targets):
        path = evaluator_path(out, d)
        if not path.exists():
            raise InputError(f"{path} is missing: train the evaluation classifier first with --attr {d['attrs'][0]} "
                             f"--what evaluator --out {out}")
        check_evaluator_fits(ckpt_io.load(path)["config"], d["attrs"][0], d["image_size"], path)
        labels = celeba_split(d["path"], d["attrs"], "train")[1]
        have = (int((labels == 0).sum()), int((labels == 1).sum()))
        for sel in selections:
            if isinstance(sel, tuple) and (sel[0] > have[0] or sel[1] > have[1]):
                raise InputError(f"--top-k {sel[0]},{sel[1]} asks for more than the train split holds: {have[0]} of "
                                 f"label 0 and {have[1]} of label 1 for {d['attrs'][0]} (fewer survive the filter)")
    results = [_filter_attribute(d, out, selections, stage1, tau1, tau2, members, steps, width, seed, device)
               for d, selections in zip(singles, targets)]
    short = [f"{selection_name(sel)} of {a}: {n0} of label 0 and {n1} of label 1"
             for a, (_, missing) in zip(attrs, results) for sel, (n0, n1) in missing.items()]
    if len(attrs) == 2:
        stem = evaluator_path(out, data_config).stem.replace("evaluator_", "subset_")
        report = dict(classes=", ".join(f"{c} = {n}" for c, n in enumerate(class_names(attrs))))
        for sa, sb in zip(*targets):
            if sa not in results[0][0] or sb not in results[1][0]:
                continue
            name = selection_name(sa) if sa == sb else f"{selection_name(sa)}_{selection_name(sb)}"
            path = out / f"{stem}_{name}.txt"
            path.write_text("".join(f"{p}\n" for p in np.intersect1d(results[0][0][sa], results[1][0][sb])))
            labels = celeba_split(data_config["path"], attrs, "train", path)[1]
            per_class = [int((labels == c).sum()) for c in range(4)]
            report[f"size_{name}"] = int(len(labels))
            report.update({f"class{c}_{name}": n for c, n in enumerate(per_class)})
            print(f"[filter] {path}: {len(labels)} images, per class {per_class} ({report['classes']})", flush=True)
        if len(report) > 1:                         # at least one 4-class set was made
            write_report(report, out, f"4-class training set (App. F) for {attrs}", stem=f"{stem}_report",
                         device=device)
    if short:
        raise InputError(f"--top-k asks for more than survive the filter ({'; '.join(short)}); lower --top-k or "
                         f"--tau1/--tau2 (survivors: {out}/subset_<attr>_stage2.txt)")


def evaluator_paths(evaluators, data_config, run):
    """The evaluation classifiers that score a run's samples, one per attribute of --attr (two: the x and y of
    Fig. 9): `evaluators` (--evaluator) if given; else evaluator_<attr>.pt (evaluator_path) in the run folder,
    or in the folder of its --subset file, where `train.py --what filter` made it (a run trained in another --out
    on the subset, e.g. the data-size ablation of Sec. 5.2). Circles, sizes and image folders need none: [].
    Raises InputError (one line, naming --evaluator) when a CelebA run has none, and for a file that is not an
    evaluation classifier: an experiment's evaluation is never skipped.
    """
    if data_config["name"] != "celeba":
        if evaluators:
            raise InputError(f"--evaluator scores CelebA attributes; this run has {data_config['name']} data, "
                             f"scored without one: drop --evaluator")
        return []
    if evaluators and len(evaluators) != len(data_config["attrs"]):
        raise InputError(f"got {len(evaluators)} --evaluator for the run's {len(data_config['attrs'])} attribute(s) "
                         f"{','.join(data_config['attrs'])}: give one per attribute, in --attr order")
    folders = [Path(run)] + ([Path(data_config["subset"]).parent] if data_config.get("subset") else [])
    paths = [Path(p) for p in evaluators or []]
    for attr in ([] if evaluators else data_config["attrs"]):
        name = evaluator_path("", dict(attrs=[attr])).name
        found = [f / name for f in folders if (f / name).is_file()]
        if not found:
            raise InputError(f"no evaluation classifier of {attr} ({name} in {' or '.join(map(str, folders))}) to "
                             f"score the samples; pass --evaluator PATH, or train one with `train.py --data celeba "
                             f"--attr {attr} --what evaluator --out {run}`")
        paths.append(found[0])
    for path, attr in zip(paths, data_config["attrs"]):
        ckpt = ckpt_io.load(path)
        if ckpt.get("kind") != "evaluator":
            raise InputError(f"--evaluator {path} is not an evaluation classifier; train one with `train.py --data "
                             f"celeba --what evaluator`")
        check_evaluator_fits(ckpt["config"], attr, data_config["image_size"], path)
    return paths


def check_evaluator_fits(evaluator_config, attr, image_size, path):
    """An evaluation classifier scores the attribute and image size it was trained on; else InputError."""
    d = evaluator_config["data"]
    if d["attrs"] != [attr] or d["image_size"] != image_size:
        raise InputError(f"evaluator {path} scores {','.join(d['attrs'])} at {d['image_size']}px, the run needs "
                         f"{attr} at {image_size}px: train one with `train.py --data celeba --attr {attr} "
                         f"--image-size {image_size} --what evaluator`")


def attribute_report(samples, evaluators, data_config, run, out, label, device):
    """Scores of the samples by the evaluation classifier(s): the 100-bin histogram (log y) against the
    training data and unguided samples, KLD / "MSE" to uniform (paper-exact and [0, 1] bins), the samples
    with p in [0.49, 0.51] (Fig. 4, 8); with two evaluators the 20x20 ln-count heatmap (Fig. 9)."""
    models = [load_evaluator(p, device)[0] for p in evaluators]
    report = dict(evaluators=", ".join(map(str, evaluators)))
    score = lambda imgs: [predict_probs(m, imgs, device=device)[:, 1].numpy() for m in models]
    train_images, _ = load_data(data_config)
    sets = {"training data": train_images}
    if (run / "ddpm_samples.npz").exists() and label != "unguided":
        sets["unguided"] = load_samples(run / "ddpm_samples.npz")
    sets[label] = samples
    scores = {name: score(imgs) for name, imgs in sets.items()}
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
