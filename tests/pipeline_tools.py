"""Tools for tests/test_pipelines.py and tests/test_pipeline_subsets.py: run train.py's paths in this process and look
at what its networks train on.

`capture` runs train.main with train.fit replaced by a recorder (the model, loss function and Batches each path
builds, no step taken); `AdamWatch` follows every AdamW step of a real run through torch's global optimizer hook;
`watched_clean_classifier` records what appendix/evaluator.py's training loop draws and feeds its network; `match` finds a
drawn image among the data set's images (as stored or mirrored); the measures (disc centroid, disc radius, hair
darkness, stroke thickness) read the attribute a label names from the pixels.
"""
import contextlib
import math
import signal

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from appendix import evaluator
import train
from celeba_tree import make_celeba_tree
from data import celeba_split, load_images
from appendix.evaluator import EvalNet
from beyond.mnist import read_idx
from beyond.morpho import stroke_thickness
from tiny_flags import for_what

TINY = ["--image-size", "16", "--model-channels", "8", "--classifier-width", "8", "--eval-width", "8",
        "--eval-samples", "0", "--log-every", "100000", "--ckpt-every", "100000", "--no-amp", "--no-overlap"]
STEPS = 60          # (a): steps of each training run
LATE = 40           # (a): parameters are compared between step LATE and the last step
MIN_MOVE = 0.3      # (a): RMS change of every parameter over the last STEPS - LATE steps, in units of lr
MAX_MOMENT = 1e3    # (a): Adam's bias-corrected v̂ over the median step's mean g²
NEGLIGIBLE = 1e-4   # (a): a late gradient RMS below this fraction of the median tensor's is none (round-off)


# ---------------------------------------------------------------------------------------------------
# Running train.py's paths in this process
# ---------------------------------------------------------------------------------------------------

def train_main(*argv):
    """train.py's main() here with the tiny sizes its --what uses (tiny_flags), its SIGINT/SIGTERM handlers put
    back afterwards."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.main(for_what(argv))
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def captured(mark=False):
    """train.fit replaced by a recorder: each call's kind, model, loss_fn and batches (no step taken). The
    classifier heatmap plot is skipped (a picture of an untrained model). mark: every training image gets one grey
    pixel at (row 0, column 0), where no disc of circles or sizes reaches, so a mirrored image shows (`mirrored`)."""
    calls = []

    def fake_fit(kind, model, loss_fn, batches, **kwargs):
        calls.append(dict(kind=kind, model=model, loss_fn=loss_fn, batches=batches, kwargs=kwargs))
        return model, None

    def marked(data_config):
        out = []
        for images, labels in real_sets(data_config):      # the DDPM's and the classifier's
            images = images.copy()
            images[:, 0, 0] = 128
            out.append((images, labels))
        return tuple(out)

    real_sets = train.training_sets
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "fit", fake_fit)
        mp.setattr(train, "plot_heatmaps", lambda *a, **k: None)
        if mark:
            mp.setattr(train, "training_sets", marked)
        yield calls


def capture(*argv, mark=False):
    """{kind: the fit call} of one train.py invocation, nothing trained."""
    with captured(mark) as calls:
        train_main(*argv)
    return {c["kind"]: c for c in calls}


def mirrored(x):
    """Which images of a marked data set (captured(mark=True)) were drawn mirrored: the mark at row 0, last column."""
    left, right = x[:, :, 0, 0].amax(1) > -0.9, x[:, :, 0, -1].amax(1) > -0.9
    assert torch.equal(left, ~right), "the mark is lost"
    return right


def draw(batches, n):
    """n batches of a Batches object, concatenated: (x float [N, C, H, W], y [N])."""
    xs, ys = zip(*(next(batches) for _ in range(n)))
    return torch.cat(xs), torch.cat(ys)


def to_u8(x):
    """Batches' float [-1, 1] back to uint8 [N, H, W, C] (exact for unaugmented images: x = u8 / 127.5 - 1)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def match(x, images):
    """For each drawn image (float [N, C, H, W]): (index into images uint8 [M, H, W, C] of the first dataset image
    it equals exactly, as it is or mirrored left-right; mirrored?; every index it equals that way: a data set may
    hold duplicates). AssertionError if it equals none (noise added, a crop)."""
    ref = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = []
    for img in x:
        same = (ref == img).flatten(1).all(1)
        hits = same if same.any() else (ref.flip(-1) == img).flatten(1).all(1)
        assert hits.any(), "a drawn image is no dataset image, nor its mirror image"
        indices = hits.nonzero()[:, 0].tolist()
        out.append((indices[0], not bool(same.any()), indices))
    return out


# ---------------------------------------------------------------------------------------------------
# (a) every parameter trains
# ---------------------------------------------------------------------------------------------------

class AdamWatch:
    """Every AdamW step taken inside the block (torch's global optimizer hook, so any training loop): per optimizer,
    its parameters after step `late`, and each parameter's mean squared gradient at every step."""

    def __init__(self, late):
        self.late, self.runs = late, []

    def __enter__(self):
        self.handle = register_optimizer_step_post_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def hook(self, opt, args, kwargs):
        if not isinstance(opt, torch.optim.AdamW):
            return
        run = next((r for r in self.runs if r["opt"] is opt), None)
        if run is None:
            params = [p for g in opt.param_groups for p in g["params"]]
            run = dict(opt=opt, steps=0, params=params, g2=[[] for _ in params])
            self.runs.append(run)
        run["steps"] += 1
        for g2, p in zip(run["g2"], run["params"]):
            g2.append(0.0 if p.grad is None else float(p.grad.detach().double().pow(2).mean()))
        if run["steps"] == self.late:
            run["at_late"] = [p.detach().clone() for p in run["params"]]


def training_report(run, names):
    """Per parameter: (name, RMS change since step LATE in units of lr, Adam's bias-corrected v̂ over the median
    step's mean g², RMS gradient of the late steps, moments finite)."""
    opt = run["opt"]
    lr, (_, beta2) = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
    rows = []
    for p, before, g2 in zip(run["params"], run["at_late"], run["g2"]):
        state = opt.state[p]
        finite = bool(torch.isfinite(state["exp_avg"]).all() and torch.isfinite(state["exp_avg_sq"]).all())
        v_hat = float(state["exp_avg_sq"].double().mean()) / (1 - beta2 ** float(state["step"]))
        median = float(np.median(g2))
        rows.append((names.get(id(p), f"<unnamed {tuple(p.shape)}>"),
                     float((p.detach() - before).double().pow(2).mean().sqrt()) / lr,
                     v_hat / median if median > 0 else math.inf, math.sqrt(np.mean(g2[LATE:])), finite))
    return rows


def assert_every_parameter_trains(run, model, dead=()):
    """The checks of (a) on one AdamWatch run; `dead`: names whose gradient is zero by construction (they are checked
    to get none beyond round-off instead)."""
    assert run["steps"] == STEPS
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(names) == {id(p) for p in run["params"]}, "the optimizer holds other parameters than the network's"
    rows = training_report(run, names)
    typical = float(np.median([g for name, _, _, g, _ in rows if name not in dead]))
    problems = []
    for name, move, moment, grad, finite in rows:
        if not finite:
            problems.append(f"{name}: Adam moments not finite")
        if name in dead:
            if not grad < NEGLIGIBLE * typical:
                problems.append(f"{name}: gradient RMS {grad:.3g}, expected zero (typical {typical:.3g})")
            continue
        if not move > MIN_MOVE:
            problems.append(f"{name}: moved {move:.3g} lr over steps {LATE}..{STEPS}")
        if not moment < MAX_MOMENT:
            problems.append(f"{name}: Adam's v̂ is {moment:.3g}x the median step's g² (a gradient blown up)")
        if not grad > NEGLIGIBLE * typical:
            problems.append(f"{name}: late gradient RMS {grad:.3g}, typical {typical:.3g}")
    assert not problems, "parameters that do not train:\n" + "\n".join(problems)


@contextlib.contextmanager
def recorded_models():
    """The networks train.fit trains, in a list (the real fit runs)."""
    models, real_fit = [], train.fit

    def fit(kind, model, *args, **kwargs):
        models.append(model)
        return real_fit(kind, model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "fit", fit)
        mp.setattr(train, "plot_heatmaps", lambda *a, **k: None)
        yield models


# ---------------------------------------------------------------------------------------------------
# The clean classifiers (appendix/evaluator.py's training loop) and the measures of (b)-(d)
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def watched_clean_classifier():
    """Inside: AdamWatch, the EvalNets built (by evaluator.EvalConfig.build), every batch evaluator.Batches draws
    and the arguments of every call of an EvalNet in training mode (the input, then any others)."""
    rec = dict(models=[], draws=[], inputs=[], flips=[])
    real_build = evaluator.EvalConfig.build

    def build(self):
        rec["models"].append(real_build(self))
        return rec["models"][-1]

    class RecordingBatches(evaluator.Batches):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rec["flips"].append(self.flip)

        def __next__(self):
            x, y = super().__next__()
            rec["draws"].append((x.clone(), y.clone()))
            return x, y

    def pre_hook(module, args):
        if isinstance(module, EvalNet) and module.training:
            rec["inputs"].append((args[0].detach().clone(), args[1:]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        with AdamWatch(LATE) as watch, pytest.MonkeyPatch.context() as mp:
            mp.setattr(evaluator.EvalConfig, "build", build)
            mp.setattr(evaluator, "Batches", RecordingBatches)
            rec["watch"] = watch
            yield rec
    finally:
        handle.remove()


def hair_dark_share(x):
    """Share of each image's pixels darker than luma 45/255: the CelebA tree's black hair (RGB 20, 15, 10) is its
    only so dark region (background >= 60, eyes 30 but a pixel or two, mouth luma 70); blond hair is bright."""
    u = (x + 1) * 127.5
    luma = 0.299 * u[:, 0] + 0.587 * u[:, 1] + 0.114 * u[:, 2]
    return (luma < 45).float().mean((1, 2))


def celeba_with_evaluator(root, out, eval_steps):
    """A miniature CelebA in `root` (tests/celeba_tree.py, 240 faces) and its Smiling evaluation classifier trained
    `eval_steps` steps by `train.py --what evaluator` into `out`. Returns dict(root, out, images: the train split at
    16 px in file order, and from the tree's own draw: black (hair), smile (mouth curvature > 0), young)."""
    latent = make_celeba_tree(root, n=240, seed=3)
    train_main("--data", "celeba", "--data-dir", root, "--attr", "Smiling", "--what", "evaluator", "--eval-steps",
               eval_steps, *TINY, "--out", out)
    files = np.flatnonzero(latent["split"] == 0)
    paths, _, _, _, _ = celeba_split(root, ["Smiling"], "train")
    return dict(root=root, out=out, images=load_images(paths, 16), black=latent["black_hair"][files],
                smile=latent["curvature"][files] > 0, young=read_young(root)[files])


def read_young(root):
    """The Young column of the tree's list_attr_celeba.txt (count, names, then `file v1 .. vK` with ±1), in file
    order, read here."""
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    column = lines[1].split().index("Young") + 1
    return np.array([int(line.split()[column]) > 0 for line in lines[2:] if line.strip()])


def disc_centre_x(x):
    """The x of each image's bright-pixel centroid (weights x + 1: the black background weighs 0), in pixels; row 0
    (the mark of captured(mark=True)) left out, which keeps a disc's centroid x (a disc is symmetric about it)."""
    w = (x[:, :, 1:] + 1).sum(1)
    cols = torch.arange(x.shape[-1], dtype=x.dtype)
    return (w.sum(1) * cols).sum(1) / w.sum((1, 2))


def disc_radius(x):
    """Each image's disc radius from its bright area (pixels above mid-grey): sqrt(area / π)."""
    return ((x.mean(1) > 0).float().sum((1, 2)) / math.pi).sqrt()


def digits_data(root, delta, size=32):
    """The pool's stroke thickness measured here (padded like the run's images) and the δ rule's thresholds: the
    round(δN)-th thinnest and thickest."""
    raw = read_idx(root / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz")
    a = (size - 28) // 2
    padded = np.zeros((len(raw), size, size, 1), dtype=np.uint8)
    padded[:, a:a + 28, a:a + 28, 0] = raw
    t = stroke_thickness(padded)
    k = int(round(delta * len(t)))
    order = np.sort(t)
    return padded, t, k, order[k - 1], order[-k]


def alphas_cumprod(schedule, T):
    """ᾱ_t, t = 0..T-1, in closed form: cosine [IDDPM eq. 17] (β clipped at 0.999) or linear [DDPM] rescaled to T
    as improved-diffusion (β from 1e-4·1000/T to 0.02·1000/T)."""
    if schedule == "cosine":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    else:
        betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    return np.cumprod(1 - betas)


def chi2_bound(df, z=4.75):
    """Wilson-Hilferty: the chi-square quantile of df degrees of freedom at the normal quantile z (4.75: p ≈ 1e-6)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def evaluator_p1(path, images):
    """p(class 1) of an evaluator checkpoint on uint8 images: softmax of its logits (temperature included)."""
    model, _ = evaluator.load_evaluator(path)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return model(x).softmax(1)[:, 1].double().numpy()


def assert_top_k(p1, labels, kept, survivors, k0, k1):
    """App. D's top-k: of the survivors, kept holds exactly k0 of label 0 and k1 of label 1, every kept label-0
    score <= every dropped label-0 score, every kept label-1 score >= every dropped label-1 score."""
    kept, survivors = set(kept.tolist()), set(survivors.tolist())
    assert kept <= survivors
    for c, k, sign in ((0, k0, 1), (1, k1, -1)):
        ins = [sign * p1[i] for i in kept if labels[i] == c]
        outs = [sign * p1[i] for i in survivors - kept if labels[i] == c]
        assert len(ins) == k and (not outs or max(ins) <= min(outs)), (c, k)


def read_positions(path):
    """The train-split positions of an index file, one per line."""
    return np.array([int(v) for v in path.read_text().split()], dtype=np.int64)
