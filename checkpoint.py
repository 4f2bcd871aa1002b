"""Checkpoints that describe themselves, written atomically and read without executing pickled code.

A checkpoint is one `.pt` dict: {"kind", "config" (plain JSON-able dicts: data, diffusion, network,
training), "model", "ema", "opt", "scaler", "step", "rng", ...}. A readable JSON copy of "config" sits next
to it, so `sample.py --run DIR` needs nothing but the run folder. Writes go to a temporary file that is
fsync'ed and renamed over the old one, so a kill at any moment leaves either the old or the new checkpoint,
never half of one. Reads use `torch.load(..., weights_only=True)`, which refuses arbitrary pickled objects.
"""
import json
import os
import pickle
from pathlib import Path

import torch

from classifier import ClassifierConfig
from ddpm import DiffusionConfig
from unet import UNetConfig


class CheckpointError(RuntimeError):
    """A missing, truncated, foreign or malicious checkpoint; the entry points print it as one line."""


def save_atomic(obj, path):
    """torch.save to path.tmp, fsync, then rename over path (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load(path, map_location="cpu"):
    """Load a checkpoint safely; any problem becomes a CheckpointError with a one-line explanation."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; train one with `python train.py` or pass the right --run")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, refused for safety "
                              f"(weights_only=True): {str(e).splitlines()[0][:200]}")
    except Exception as e:  # truncated zip, wrong format, ...
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else 'truncated?'}); retrain or re-download it")
    if not isinstance(ckpt, dict) or "config" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this codebase (no config/model entries)")
    return ckpt


def _tuples(d):
    """JSON turns tuples into lists; the network configs want tuples back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def backbone_config(config):
    """The denoiser's constructor arguments: config["unet"], or config["dit"] for `--arch dit`."""
    return config[config.get("arch", "unet")]


def build_ddpm(config):
    """(denoiser network, Diffusion) from a DDPM config dict (arch "unet" by default, or "dit")."""
    if config.get("arch", "unet") == "dit":
        from dit import DiTConfig
        net = DiTConfig(**config["dit"]).build()
    else:
        net = UNetConfig(**_tuples(config["unet"])).build()
    return net, DiffusionConfig(**config["diffusion"]).build()


def build_classifier(config):
    return ClassifierConfig(**_tuples(config["classifier"])).build()


def load_ddpm(path, device="cpu", use_ema=True):
    """(U-Net in eval mode with EMA weights, Diffusion, config) from a ddpm.pt checkpoint."""
    ckpt = load(path)
    if ckpt.get("kind") != "ddpm":
        raise CheckpointError(f"{path} is a {ckpt.get('kind')} checkpoint, not a DDPM")
    model, diffusion = build_ddpm(ckpt["config"])
    model.load_state_dict(ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"])
    return model.to(device).eval(), diffusion, ckpt["config"]


def load_classifier(path, device="cpu"):
    """(classifier in eval mode, config) from a classifier checkpoint (spectral norm rebuilt first)."""
    ckpt = load(path)
    if ckpt.get("kind") != "classifier":
        raise CheckpointError(f"{path} is a {ckpt.get('kind')} checkpoint, not a classifier")
    model = build_classifier(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


def load_evaluator(path, device="cpu"):
    """(evaluation classifier in eval mode with its temperature, config) from an evaluator checkpoint."""
    from classifier import EvalConfig
    ckpt = load(path)
    if ckpt.get("kind") != "evaluator":
        raise CheckpointError(f"{path} is a {ckpt.get('kind')} checkpoint, not an evaluation classifier")
    model = EvalConfig(**ckpt["config"]["evaluator"]).build()
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]
