"""Checkpoints that describe themselves, written atomically and read without executing pickled code.

A checkpoint is one `.pt` dict: {"kind", "config" (plain JSON-able dicts: data, diffusion, network,
training), "model", "ema", "opt", "scaler", "step", "rng", ...}. A readable JSON copy of "config" sits next
to it, so `sample.py --run DIR` needs nothing but the run folder. Writes go to a temporary file that is
fsync'ed and renamed over the old one, so a kill at any moment leaves either the old or the new checkpoint,
never half of one; output folders are filled under a temporary name and renamed when complete
(`staged_output`). Reads use `torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects.
Any problem reading one is an InputError with a one-line explanation.
"""
import contextlib
import json
import os
import pickle
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch

from classifier import ClassifierConfig
from cli import InputError
from beyond.cpu_preset import MirrorEquivariant
from ddpm import DiffusionConfig
from appendix.dit import DiTConfig
from unet import UNetConfig


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT / SIGTERM until the block ends: Ctrl-C or a scheduler's SIGTERM during a checkpoint write reaches
    its handler right after the file is complete and renamed (train.py then saves and exits as usual), instead of
    breaking the zip writer halfway. Python handlers run in the main thread, so the block swaps in a recorder there
    (blocking the signal would not do: torch's worker threads would still take it). Elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            handler = old[caught[0]]
            if callable(handler):
                handler(caught[0], None)           # e.g. train.py's: raise KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])    # the default action, now that the file is whole


def save_atomic(obj, path):
    """torch.save to path.tmp, fsync, then rename over path (atomic on POSIX), with signals deferred meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def write_json(obj, path):
    """JSON to path.tmp, then rename over path, with signals deferred meanwhile."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)


def truncate_log(path, step):
    """Cut a loss log (CSV rows that start with their step) back to the steps <= `step`, the checkpoint a run resumes
    from: rows written after it (before a kill -9, a crash, or a refused or failed save) are trained again and would
    otherwise appear twice. A half-written last row goes too, and a row supersedes earlier ones of its step or later
    (a log repeated by an older resume). Rows kept are kept byte for byte; atomic."""
    path = Path(path)
    if not path.exists():
        return
    rows = []
    for line in path.read_bytes().splitlines(keepends=True):
        first = line.split(b",", 1)[0]
        if not (line.endswith(b"\n") and first.isdigit()) or int(first) > step:
            continue
        while rows and rows[-1][0] >= int(first):
            rows.pop()
        rows.append((int(first), line))
    tmp = path.with_name(path.name + ".tmp")
    with signals_deferred():
        tmp.write_bytes(b"".join(line for _, line in rows))
        os.replace(tmp, path)


@contextlib.contextmanager
def staged_output(out):
    """Yield a new hidden folder beside `out`'s parent to write everything into; it becomes `out` only when the
    block ends without an error. On any failure (an exception, Ctrl-C) it is deleted, so no empty or half-written
    `out` is left; an existing `out` (--overwrite) is replaced whole at the end, never mixed with new files."""
    out.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        old = tmp.with_name(tmp.name + ".old")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def load(path, map_location="cpu"):
    """Load a checkpoint safely; any problem becomes an InputError with a one-line explanation."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no checkpoint at {path}; train one with `python train.py` or pass the right --run")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path} holds objects other than tensors and plain data, refused for safety "
                         f"(weights_only=True): {str(e).splitlines()[0][:200]}")
    except Exception as e:  # truncated zip, wrong format, ...
        raise InputError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'truncated?'}); retrain or re-download it")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise InputError(f"{path} is not a checkpoint of this codebase (no config/model entries)")
    _upgrade(ckpt["config"])
    return ckpt


def read_config(path):
    """A run's config.json, as saved next to its checkpoints; InputError naming it when it is not readable JSON."""
    try:
        return _upgrade(json.loads(Path(path).read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path} is not a readable run config ({type(e).__name__}: {e}); restore it or train the "
                         f"run again") from None


def _upgrade(config):
    """Configs of runs saved before T was named diffusion_steps (improved-diffusion's name), or before the loss type
    was recorded (they trained L_hybrid), still load, and compare equal to the configs of their classifiers."""
    diffusion = config.get("diffusion")
    if isinstance(diffusion, dict) and "num_steps" in diffusion:
        diffusion["diffusion_steps"] = diffusion.pop("num_steps")
    if isinstance(diffusion, dict):
        diffusion.setdefault("loss_type", "hybrid")
    return config


def _tuples(d):
    """JSON turns tuples into lists; the network configs want tuples back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def backbone_config(config):
    """The denoiser's constructor arguments: config["unet"], or config["dit"] for `--arch dit`."""
    return config[config.get("arch", "unet")]


def build_ddpm(config):
    """(denoiser network, GaussianDiffusion) from a DDPM config dict (arch "unet" by default, or "dit")."""
    if config.get("arch", "unet") == "dit":
        net = DiTConfig(**config["dit"]).build()
    else:
        net = UNetConfig(**_tuples(config["unet"])).build()
    return net, DiffusionConfig(**config["diffusion"]).build()


def build_classifier(config, mirror_head=True):
    """The noisy classifier of config["classifier"]; wrapped in cpu_preset.MirrorEquivariant when its
    `mirror_equivariant` is set (the CPU preset's circles classifier; not in the paper) and mirror_head is True.
    InputError when the head is set for other than 2 classes."""
    kwargs = _tuples(config["classifier"])
    mirror = kwargs.pop("mirror_equivariant", False)
    classifier = ClassifierConfig(**kwargs).build()
    if not mirror:
        return classifier
    if kwargs.get("num_classes", 2) != 2:
        raise InputError(f"a mirror-equivariant head swaps 2 classes; this data has {kwargs['num_classes']}: "
                         f"pass --no-mirror-equivariant")
    return MirrorEquivariant(classifier) if mirror_head else classifier


def load_ddpm(path, device="cpu", use_ema=True):
    """(denoiser in eval mode with EMA weights, GaussianDiffusion, config) from a ddpm.pt checkpoint."""
    ckpt = load(path)
    if ckpt.get("kind") != "ddpm":
        raise InputError(f"{path} is a {ckpt.get('kind')} checkpoint, not a DDPM")
    model, diffusion = build_ddpm(ckpt["config"])
    model.load_state_dict(ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"])
    return model.to(device).eval(), diffusion, ckpt["config"]


def load_classifier(path, device="cpu", mirror_head=True):
    """(noisy classifier in eval mode, config) from a classifier checkpoint (spectral norm rebuilt first), as it
    was trained; mirror_head=False leaves out the CPU preset's mirror-equivariant head (sample.py adds it back with
    the preset's other additions, cpu_preset.Additions). The head holds no weights of its own."""
    ckpt = load(path)
    if ckpt.get("kind") != "classifier":
        raise InputError(f"{path} is a {ckpt.get('kind')} checkpoint, not a classifier")
    model = build_classifier(ckpt["config"], mirror_head)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


def check_classifier_fits(clf_config, config, path, run):
    """A guidance classifier can guide a run's DDPM when it was trained on the same noising chain q(x_t | x_0)
    (schedule and T: its p(y | x_t, t) is read at the DDPM's x_t and t, docs/paper_notes.md §16.6) and at the same
    image size and channels; loss, variance and data may differ (App. E guides with a classifier of other images); its
    classes are counted against --lambdas by cli.parse_lambdas. InputError."""
    chain = lambda c: (c["diffusion"].get("schedule", "cosine"), c["diffusion"]["diffusion_steps"])
    if chain(clf_config) != chain(config):
        raise InputError(f"classifier {path} was trained on the {'/'.join(map(str, chain(clf_config)))} chain, "
                         f"{run}/ddpm.pt on {'/'.join(map(str, chain(config)))}: train a classifier on the run's "
                         f"chain (train.py --out {run} --what classifier)")
    if clf_config["data"]["image_size"] != config["data"]["image_size"]:
        raise InputError(f"classifier {path} takes {clf_config['data']['image_size']}px images, {run} draws "
                         f"{config['data']['image_size']}px: train one at --image-size {config['data']['image_size']}")
    channels = (clf_config.get("classifier", {}).get("in_channels", 3),
                config.get(config.get("arch", "unet"), {}).get("in_channels", 3))     # configs without: RGB
    if channels[0] != channels[1]:
        kind = lambda c: f"{c}-channel ({'grayscale' if c == 1 else 'RGB' if c == 3 else 'other'})"
        raise InputError(f"classifier {path} takes {kind(channels[0])} images, {run} draws {kind(channels[1])} ones: "
                         f"train a classifier on the run's data (train.py --out {run} --what classifier)")
