"""Clean-image classifiers: the evaluation classifier (Sec. 5, EXPERIMENTS.md §5) and the extreme-subset
filter of [ZSI] App. D (EXPERIMENTS.md §15).

Evaluation classifier: classifier.EvalNet trained with cross-entropy (AdamW, horizontal flips) on the
train split, the checkpoint with the best validation accuracy kept, then temperature-scaled on the
validation split (15-bin ECE before/after stored with it). It scores samples: p(attribute | x).

Extreme subsets (App. D), following the paper where the official code deviates (§16.16):
  1. τ1: a classifier trained on the whole train split; keep the examples it classifies confidently *and*
     in agreement with the label, p(y_i | x_i) > τ1.
  2. τ2: an ensemble of 5 classifiers, each trained on a disjoint random fifth of the stage-1 set; keep the
     stage-1 examples for which every member agrees with the label with p > τ2 (the official code applied it
     to the whole train split, and for Young/hair dropped the label check: we keep both of the paper's rules).
  3. top-k: rank the survivors by the evaluation classifier's p(class 1) and keep the k lowest of class 0
     and the k highest of class 1, i.e. the k most extreme per side (the official Old/blond sides sorted
     the wrong way round). Several sizes are nested: the 5k set is inside the 10k set, and so on.
"""
import numpy as np
import torch
import torch.nn.functional as F

from classifier import EvalConfig, calibrate
from data import Batches, to_float


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
            log(f"[evaluator] step {step}/{steps} loss {float(loss):.4f} val acc {acc:.4f} (best {best[0]:.4f} "
                f"at {best[1]})")
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
