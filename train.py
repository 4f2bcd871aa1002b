"""Train the DDPM and the noisy guidance classifier(s) of [ZSI]; one run folder holds everything.

  python train.py --data circles                                # CPU preset: the DDPM and the classifier
  python train.py --data circles --what classifier --spectral-norm   # add an SN classifier to the run
  python train.py --data folder --data-dir PNGS --preset paper  # the paper's hyperparameters (GPU)

Writes into --out (default runs/<data>): config.json (data, diffusion, U-Net and training settings),
ddpm.pt (model, EMA, optimizer, scaler, step, RNG), ddpm_loss.csv, ddpm_samples.png/.npz and
ddpm_report.md (unguided EMA samples), train_examples.png, and per classifier <name>.pt, <name>.json,
<name>_loss.csv, <name>_heatmap.png (circles). A killed run continues with --resume; Ctrl-C saves first.
On a CPU, `--what all` trains the classifier in a second process during the DDPM's first steps (ClassifierBeside).

The DDPM loss is L_hybrid [IDDPM eq. 16] with t ~ U{0..T-1}; the classifier loss is the cross-entropy of
p(y | x_t, t) on the same chain (EXPERIMENTS.md §2.2, §3.2). Presets are the paper's table (EXPERIMENTS.md
§2.2, §3, §10) or a CPU preset chosen by measurement on a 2-core laptop-class CPU (RESULTS.md).
"""
import argparse
import copy
import csv
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import checkpoint as ckpt_io
from classifier import ClassifierConfig, converge_spectral_norm, default_channel_mult, noisy_classifier_loss
from data import (CELEBA_LAYOUT, Batches, DataError, celeba_split, channel_mean_stats, circles_dataset,
                  load_image_folder, load_images, oversample, save_grid, sizes_dataset)
from ddpm import DiffusionConfig
from dit import DiTConfig
from unet import UNetConfig, amp_default, autocast, count_parameters

# ---------------------------------------------------------------------------------------------------
# Presets: every default in one place. "paper" = EXPERIMENTS.md §2.2 (DDPM), §3 (classifier), §10 (circles).
# ---------------------------------------------------------------------------------------------------

PRESETS = {
    "cpu": dict(
        image_size=32,            # circles at 32x32 (paper: 64): 4x fewer pixels, same radius-2 disc
        unet=dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,),
                  num_heads=4),   # 0.72M params; a batch-32 step costs half a batch-64 step (fp32, 2 cores)
        steps=1800, batch_size=32, lr=5e-4, ema=0.995,   # short run: larger lr, faster EMA; batch 32 x 1800 = 82%
                                  # of the compute of 64 x 1100, fewer broken samples over DDPM seeds (RESULTS.md)
        lr_decay=0.0,             # constant; 0.4 fewer unguided middle circles, worse guidance (RESULTS.md)
        clf=dict(model_channels=16, num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2, 2)),
        clf_steps=800, clf_batch_size=64, clf_lr=3e-4,
        eval_steps=1000, eval_width=16,
        sample_steps=64,
        guide_from=0.375),        # no classifier gradient below t = 3T/8 (1500 of 4000): fewer faded discs (RESULTS.md)
    "paper": dict(
        image_size=64,
        unet=dict(),              # UNetConfig defaults = the paper's 121M model
        steps=250_000, batch_size=64, lr=1e-4, ema=0.9999, lr_decay=0.0,
        clf=dict(model_channels=128, num_res_blocks=2, attention_resolutions=(32, 16, 8)),
        clf_steps=150_000, clf_batch_size=64, clf_lr=3e-4,
        eval_steps=100_000, eval_width=64,
        sample_steps=250,
        guide_from=0.0),          # every step guided, as in the paper
}
PAPER_CIRCLES = dict(steps=30_000, clf=dict(model_channels=64, num_res_blocks=2, attention_resolutions=(8,)),
                     clf_steps=3_000, sample_steps=64)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a persistently non-finite loss); printed as one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data", default="circles",
                   help="dataset: circles | sizes (App. K: disc radius is the factor) | celeba (standard release layout) | folder (PNG/JPEG files {label}_{k}.png)")
    g.add_argument("--data-dir", default=None, help="CelebA root or image folder")
    g.add_argument("--attr", default="Smiling", help="celeba: one attribute, or two (a,b) for 4 classes (App. F)")
    g.add_argument("--subset", default=None, help="celeba: index file, one train-split position per line")
    g.add_argument("--oversample", default=None, help="repeat classes CLASS:FACTOR, e.g. 0:2 (Young experiment)")
    g.add_argument("--preset", choices=PRESETS, default="cpu", help="cpu: minutes on a laptop; paper: [ZSI] values")
    g.add_argument("--what", choices=("all", "ddpm", "classifier", "evaluator", "filter"), default="all",
                   help="what to train: DDPM and/or guidance classifier; celeba also: the clean evaluation classifier "
                        "(evaluator_<attr>.pt) or the extreme-subset filter of App. D (subset_<attr>_<size>.txt)")
    g.add_argument("--out", default=None, help="run folder (default runs/<data>)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds checkpoints")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and noise")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="train the classifier in a second process during the DDPM's first steps, the threads "
                        "split between the two (default: on for --what all on a CPU with 2+ threads)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision: fp16 + GradScaler on CUDA, bf16 autocast on CPU (default: on for CUDA "
                        "and for CPUs with AMX/AVX512-BF16, off otherwise: bf16 is slow without them)")
    g = p.add_argument_group("data")
    g.add_argument("--image-size", type=int, default=None, help="image side (default: preset)")
    g.add_argument("--radius", type=int, default=2, help="circles: disc radius in pixels")
    g.add_argument("--delta", type=float, default=0.2, help="circles: training support x/W in [0,δ] ∪ [1-δ,1]")
    g.add_argument("--data-seed", type=int, default=42, help="circles: shuffling seed (official: 42)")
    g = p.add_argument_group("DDPM")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: preset)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch size, split across torchrun processes (default: preset)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate, no weight decay")
    g.add_argument("--ema", type=float, default=None, help="EMA rate of the sampled weights")
    g.add_argument("--lr-decay", type=float, default=None,
                   help="fraction of the steps at the end over which the lr decays linearly to 0 (0 = constant, "
                        "the paper; default: preset)")
    g.add_argument("--diffusion-steps", type=int, default=4000, help="T of the cosine chain")
    g.add_argument("--arch", choices=("unet", "dit"), default="unet",
                   help="denoiser: the paper's attention U-Net, or a diffusion transformer (App. J)")
    g.add_argument("--dit-hidden", type=int, default=128, help="--arch dit: token width")
    g.add_argument("--dit-depth", type=int, default=4, help="--arch dit: transformer blocks")
    g.add_argument("--dit-patch", type=int, default=2, help="--arch dit: patch size")
    g.add_argument("--dit-heads", type=int, default=4, help="--arch dit: attention heads")
    g.add_argument("--cfg-dropout", type=float, default=0.0,
                   help="> 0: class-conditional U-Net for classifier-free guidance (App. J); the label is replaced "
                        "by the null label with this probability")
    g.add_argument("--variance", choices=("learned", "large", "small"), default="learned",
                   help="Σ_θ: learned range + L_hybrid [IDDPM] (paper), or fixed β_t (large) / β̃_t (small) with "
                        "L_simple only [DDPM]")
    g.add_argument("--vb-scale", type=float, default=1.0,
                   help="weight of L_t in L_hybrid: 1 = official configs, T/1000 = paper text's λ=0.001")
    g.add_argument("--model-channels", type=int, default=None, help="U-Net base width (default: preset)")
    g.add_argument("--channel-mult", default=None, help="U-Net width multipliers per level, e.g. 1,2,2")
    g.add_argument("--num-res-blocks", type=int, default=None, help="U-Net residual blocks per level")
    g.add_argument("--attention-resolutions", default=None, help="feature-map sizes with attention, e.g. 16,8")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="respaced steps for sampling, in 1..--diffusion-steps (default: preset)")
    g.add_argument("--dc-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="sample with ε̂'s per-image channel means replaced by their closed-form posterior mean "
                        "(ddpm.Diffusion.dc_corrected_eps; not in the paper; default: on for the cpu preset)")
    g.add_argument("--guide-t-min", type=int, default=None,
                   help="sample.py guides only at timesteps t >= this (guidance.above_timestep; not in the paper; "
                        "default: 3T/8 = 1500 for the cpu preset, 0 = every step for paper)")
    g.add_argument("--eval-samples", type=int, default=256, help="unguided EMA samples drawn after training")
    g = p.add_argument_group("classifier")
    g.add_argument("--classifier-name", default=None, help="file stem in the run (default classifier / classifier_sn)")
    g.add_argument("--classifier-steps", type=int, default=None, help="optimizer steps (default: preset)")
    g.add_argument("--classifier-batch-size", type=int, default=None, help="batch size (default: preset)")
    g.add_argument("--classifier-lr", type=float, default=None, help="AdamW learning rate")
    g.add_argument("--classifier-width", type=int, default=None, help="base width (default: preset)")
    g.add_argument("--classifier-pool", choices=("attention", "adaptive"), default=None,
                   help="head: attention pooling (paper) or global average pooling (default: preset)")
    g.add_argument("--spectral-norm", action="store_true", help="spectral normalisation of conv/linear weights")
    g.add_argument("--mirror-equivariant", action=argparse.BooleanOptionalAction, default=None,
                   help="two classes that swap under a horizontal flip (circles): logits(flip x) = swapped "
                        "logits(x) by construction; not in the paper (default: on for circles with the cpu preset)")
    g.add_argument("--lipschitz", type=float, default=0.5, help="per-layer Lipschitz factor with --spectral-norm")
    g.add_argument("--classifier-augment", choices=("none", "flip", "mirror"), default=None,
                   help="none (official for circles, the default there); flip (h-flip, the default for CelebA and "
                        "folders); mirror (h-flip and swap labels 0/1)")
    g.add_argument("--classifier-intensity", type=float, default=1.0,
                   help="train the classifier on images dimmed towards black by a factor ~ U(A, 1) (circles: a dim "
                        "disc keeps its side's label; not in the paper); 1 = off")
    g = p.add_argument_group("evaluation classifier and extreme-subset filter (celeba, App. D)")
    g.add_argument("--eval-steps", type=int, default=None, help="training steps of each clean classifier")
    g.add_argument("--eval-width", type=int, default=None, help="base width of the clean classifier (ResNet)")
    g.add_argument("--train-size", default="60000,30000,10000,5000",
                   help="subset sizes to write (k = size/2 per side, nested)")
    g.add_argument("--tau1", type=float, default=0.95, help="stage-1 confidence threshold")
    g.add_argument("--tau2", type=float, default=0.9999, help="ensemble confidence threshold")
    g.add_argument("--members", type=int, default=5, help="ensemble size")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=100, help="progress line every N steps")
    g.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    return p.parse_args(argv)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    return torch.device(name)


def parse_ints(text, flag, kind=int):
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"{flag} {text!r} is not a comma-separated list of numbers, e.g. 1,2,2")


def build_config(args):
    """The DDPM run config (data, diffusion, unet, train, sampling) from preset + flags."""
    preset = copy.deepcopy(PRESETS[args.preset])
    if args.preset == "paper" and args.data == "circles":
        preset.update(PAPER_CIRCLES)
    image_size = args.image_size or preset["image_size"]
    if args.data == "circles":
        data = dict(name="circles", image_size=image_size, radius=args.radius, delta=args.delta, seed=args.data_seed)
    elif args.data == "sizes":
        data = dict(name="sizes", image_size=image_size, r_min=2, r_max=min(11, image_size // 2 - 2),
                    delta=args.delta, seed=args.data_seed)
    elif args.data == "celeba":
        if not args.data_dir:
            raise DataError(f"--data celeba needs --data-dir ROOT with {CELEBA_LAYOUT}")
        data = dict(name="celeba", image_size=image_size, path=str(args.data_dir), attrs=args.attr.split(","),
                    subset=args.subset, oversample=args.oversample, split="train")
    elif args.data == "folder":
        if not args.data_dir:
            raise DataError("--data folder needs --data-dir DIR with PNG/JPEG files named {label}_{k}.png")
        data = dict(name="folder", image_size=image_size, path=str(args.data_dir))
    else:
        raise DataError(f"--data {args.data!r} is not a dataset; choose circles, sizes, celeba or folder")
    unet = dict(preset["unet"], image_size=image_size)
    unet.setdefault("channel_mult", default_channel_mult(image_size))   # official per-size choice (64: 1,2,3,4)
    if args.model_channels:
        unet["model_channels"] = args.model_channels
    if args.channel_mult:
        unet["channel_mult"] = parse_ints(args.channel_mult, "--channel-mult", float)
    if args.num_res_blocks:
        unet["num_res_blocks"] = args.num_res_blocks
    if args.attention_resolutions:
        unet["attention_resolutions"] = parse_ints(args.attention_resolutions, "--attention-resolutions")
    learned = args.variance == "learned"
    unet["out_channels"] = 6 if learned else 3
    unet_cfg = UNetConfig(**unet)
    clf = dict(preset["clf"], image_size=image_size, channel_mult=preset["clf"].get(
        "channel_mult", default_channel_mult(image_size)))
    if args.classifier_width:
        clf["model_channels"] = args.classifier_width
    if args.classifier_pool:
        clf["pool"] = args.classifier_pool
    mirror = args.mirror_equivariant
    if mirror is None:  # the cpu preset's circles classifier; RESULTS.md has the paper's head too
        mirror = args.preset == "cpu" and args.data == "circles"
    clf_cfg = ClassifierConfig(**clf, spectral_norm=args.spectral_norm, lipschitz=args.lipschitz,
                               mirror_equivariant=mirror)
    return dict(
        data=data,
        diffusion=asdict(DiffusionConfig(num_steps=args.diffusion_steps, vb_scale=args.vb_scale,
                                         learn_sigma=learned, sigma_small=args.variance == "small")),
        unet=asdict(unet_cfg),
        arch=args.arch,
        **({"dit": asdict(DiTConfig(image_size=image_size, patch_size=args.dit_patch, hidden_size=args.dit_hidden,
                                    depth=args.dit_depth, num_heads=args.dit_heads,
                                    learn_sigma=learned))} if args.arch == "dit" else {}),
        train=dict(steps=args.steps or preset["steps"], batch_size=args.batch_size or preset["batch_size"],
                   lr=args.lr or preset["lr"], ema=args.ema or preset["ema"], amp=args.amp, seed=args.seed,
                   lr_decay=preset["lr_decay"] if args.lr_decay is None else args.lr_decay,
                   cfg_dropout=args.cfg_dropout,
                   flip=True, preset=args.preset),
        sample_steps=preset["sample_steps"] if args.sample_steps is None else args.sample_steps,
        dc_correction=args.preset == "cpu" if args.dc_correction is None else args.dc_correction,
        guide_t_min=(round(preset["guide_from"] * args.diffusion_steps) if args.guide_t_min is None
                     else args.guide_t_min),
        classifier=asdict(clf_cfg),
        classifier_train=dict(steps=args.classifier_steps or preset["clf_steps"],
                              batch_size=args.classifier_batch_size or preset["clf_batch_size"],
                              lr=args.classifier_lr or preset["clf_lr"], seed=args.seed,
                              augment=args.classifier_augment or ("none" if args.data in ("circles", "sizes") else "flip"),
                              intensity=args.classifier_intensity),
    )


def check_run(args, config, device, world, what):
    """Every constraint between the flags (and the preset defaults they combine with), in one place, checked
    before any data is read or anything is written: a bad combination is one DataError line and exit 2, never
    a crash after training. `config` is build_config's (with a saved run's data and chain when adding a
    classifier); `what` the models to train.
    """
    T = config["diffusion"]["num_steps"]
    if args.resume and args.overwrite:
        raise DataError("--resume continues the run's checkpoints and --overwrite starts afresh: pass one of them")
    if args.what in ("evaluator", "filter") and config["data"]["name"] != "celeba":
        raise DataError(f"--what {args.what} needs --data celeba (train/valid splits and attributes)")
    if args.overlap and args.what != "all":
        raise DataError(f"--overlap trains the classifier beside the DDPM, and --what {args.what} trains one "
                        f"model: use --what all or drop --overlap")
    if args.overlap and (device.type != "cpu" or world > 1):
        raise DataError("--overlap runs on the CPU in one process; drop it for GPUs and torchrun")
    if T < 1:
        raise DataError(f"--diffusion-steps must be a positive integer, got {T}")
    positive = [("--steps", args.steps), ("--batch-size", args.batch_size),
                ("--classifier-steps", args.classifier_steps), ("--classifier-batch-size", args.classifier_batch_size),
                ("--log-every", args.log_every), ("--ckpt-every", args.ckpt_every), ("--eval-steps", args.eval_steps),
                ("--eval-width", args.eval_width), ("--members", args.members), ("--image-size", args.image_size),
                ("--radius", args.radius)]
    for name, value in positive:
        if value is not None and value < 1:
            raise DataError(f"{name} must be a positive integer, got {value}")
    for name, value in (("--lr", args.lr), ("--classifier-lr", args.classifier_lr), ("--lipschitz", args.lipschitz)):
        if value is not None and not 0 < value < float("inf"):
            raise DataError(f"{name} must be a positive number, got {value}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise DataError(f"--ema is the EMA rate, in (0, 1), got {args.ema}")
    if not 0 <= args.vb_scale < float("inf"):
        raise DataError(f"--vb-scale is the weight of L_t, a number >= 0, got {args.vb_scale}")
    if args.eval_samples < 0:
        raise DataError(f"--eval-samples must be >= 0 (0 = no samples after training), got {args.eval_samples}")
    if not 0 <= args.cfg_dropout < 1:
        raise DataError(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    if args.lr_decay is not None and not 0 <= args.lr_decay <= 1:
        raise DataError(f"--lr-decay is the fraction of the steps with a decaying lr, in [0, 1]; got {args.lr_decay}")
    if not 0 <= args.classifier_intensity <= 1:
        raise DataError(f"--classifier-intensity is the smallest dimming factor, in [0, 1] (1 = off); "
                        f"got {args.classifier_intensity}")
    if config["data"]["name"] in ("circles", "sizes") and not 0 < args.delta <= 0.5:
        raise DataError(f"--delta is the width of each training border, in (0, 0.5]; got {args.delta}")
    if not 0 <= config["guide_t_min"] <= T:
        raise DataError(f"--guide-t-min is a timestep in [0, {T}] (0 = guide every step); got {config['guide_t_min']}")
    if "ddpm" in what and not 1 <= config["sample_steps"] <= T:
        given = "--sample-steps" if args.sample_steps is not None else f"the {args.preset} preset's --sample-steps"
        raise DataError(f"{given} {config['sample_steps']} must be in 1..{T} (--diffusion-steps {T}): pass "
                        f"--sample-steps between 1 and {T}, or more --diffusion-steps")
    if args.what == "filter":
        sizes = parse_ints(args.train_size, "--train-size")
        if min(sizes) < 2:
            raise DataError(f"--train-size takes subset sizes >= 2 (k = size/2 per side), got {args.train_size}")
        for name, tau in (("--tau1", args.tau1), ("--tau2", args.tau2)):
            if not 0 < tau < 1:
                raise DataError(f"{name} is a confidence threshold, in (0, 1); got {tau}")
    for flag, b in (("--batch-size", config["train"]["batch_size"]),
                    ("--classifier-batch-size", config["classifier_train"]["batch_size"])):
        if b % world:
            raise DataError(f"{flag} {b} (the global batch) is not divisible by the {world} processes")
    image_size = config["data"]["image_size"]
    nets = [("U-Net", config["unet"]["channel_mult"] if config.get("arch", "unet") == "unet" else None),
            ("classifier", config["classifier"]["channel_mult"])]
    for net, mult in nets:
        if mult is not None and image_size % 2 ** (len(mult) - 1):
            raise DataError(f"--image-size {image_size} is not divisible by {2 ** (len(mult) - 1)}, the total "
                            f"downsampling of the {net} (channel_mult {tuple(mult)}); pick a multiple of it")
    # The rest (attention heads vs widths, DiT patch and heads): build both networks without memory.
    structure = dict(config, classifier=dict(config["classifier"], spectral_norm=False))  # SN's init needs values
    for net, build in (("denoiser", lambda: ckpt_io.build_ddpm(structure)),
                       ("classifier", lambda: ckpt_io.build_classifier(structure))):
        if net == "denoiser" and "ddpm" not in what or net == "classifier" and "classifier" not in what:
            continue
        try:
            with torch.device("meta"):
                build()
        except (ValueError, AssertionError) as e:
            raise DataError(f"the {net} cannot be built from these flags: {e}") from None


def load_data(data_cfg):
    """(uint8 images [N, H, W, 3], labels [N]) of the training set."""
    if data_cfg["name"] == "sizes":
        images, labels, _ = sizes_dataset(data_cfg["image_size"], data_cfg["r_min"], data_cfg["r_max"],
                                          data_cfg["delta"], seed=data_cfg["seed"])
        return images, labels
    if data_cfg["name"] == "circles":
        images, labels, _ = circles_dataset(data_cfg["image_size"], data_cfg["radius"], data_cfg["delta"],
                                            seed=data_cfg["seed"])
        return images, labels
    if data_cfg["name"] == "celeba":
        paths, labels, _, _, _ = celeba_split(data_cfg["path"], data_cfg["attrs"], data_cfg.get("split", "train"),
                                           data_cfg.get("subset"))
        return oversample(load_images(paths, data_cfg["image_size"]), labels, data_cfg.get("oversample"))
    images, labels, _ = load_image_folder(data_cfg["path"], data_cfg["image_size"])
    return oversample(images, labels, data_cfg.get("oversample"))


# ---------------------------------------------------------------------------------------------------
# The training loop shared by the DDPM and the classifier
# ---------------------------------------------------------------------------------------------------

def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def lr_at(step, steps, lr, decay=0.0):
    """lr of optimizer step `step` (0-based): constant, then linear to 0 over the last `decay` of the steps."""
    start = steps * (1 - decay)
    if decay <= 0 or step < start:
        return lr
    return lr * max(0.0, (steps - step) / (steps - start))


@torch.no_grad()   # with grad on, every EMA tensor would join the autograd graph, one node per step
def ema_update(ema_params, params, rate):
    """ema <- rate·ema + (1 - rate)·θ, in place."""
    torch._foreach_lerp_(ema_params, params, 1 - rate)


def fit(kind, model, loss_fn, batches, *, steps, lr, ema_rate, amp, device, path, config, resume,
        log_every=100, ckpt_every=500, max_bad_steps=20, label=None, dist=(0, 1), lr_decay=0.0,
        before_step=None):
    """AdamW (no weight decay, lr schedule `lr_at`) with optional EMA, autocast and GradScaler; checkpoints
    `path` atomically.

    loss_fn(model, x, y, generator) -> (mean loss, dict of floats to log). Returns (model, ema).
    Resumes model, EMA, optimizer, scaler, RNG and step from `path` when `resume` and it exists.
    kind ("ddpm" | "classifier") is stored in the checkpoint; label prefixes the progress lines.
    dist = (rank, world) under torchrun: every rank draws the same global batch (and noise) and trains on
    its slice through DistributedDataParallel, so N processes take the same steps as one process with the
    same global --batch-size; rank 0 alone writes checkpoints and logs.
    before_step(step), if given, is called before every step (ClassifierBeside switches threads there).
    """
    rank, world = dist
    label = label or kind
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_rate else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    gen = torch.Generator().manual_seed(config["seed"] + 1)
    step, log_path = 0, path.with_name(path.stem + "_loss.csv")
    if resume and path.exists():
        state = ckpt_io.load(path)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"]["loss"])
        batches.generator.set_state(state["rng"]["batches"])
        step = state["step"]
        print(f"[{label}] resumed from {path} at step {step}", flush=True)
    elif log_path.exists() and rank == 0:
        log_path.unlink()

    def save():
        if rank != 0:
            return
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            print(f"[{label}] parameters are not finite at step {step}: kept the last good checkpoint {path}",
                  flush=True)
            return
        ckpt_io.save_atomic(dict(kind=kind, config=config, step=step, model=model.state_dict(),
                                 ema=ema.state_dict() if ema is not None else None, opt=opt.state_dict(),
                                 scaler=scaler.state_dict(),
                                 rng=dict(loss=gen.get_state(), batches=batches.generator.get_state())), path)

    ema_params = [p for p in ema.parameters()] if ema is not None else []
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    part = slice(rank * batches.batch_size // world, (rank + 1) * batches.batch_size // world)
    params = [p for p in model.parameters()]
    model.train()
    t0, step0, bad, logs = time.time(), step, 0, {}
    log_file = open(log_path if rank == 0 else os.devnull, "a", newline="")
    writer = csv.writer(log_file)
    try:
        while step < steps:
            if before_step is not None:
                before_step(step)
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                loss, logs = loss_fn(net, x, y, gen, part)
            if not torch.isfinite(loss):
                bad += 1
                if bad >= max_bad_steps:
                    raise TrainingError(f"{label}: loss was not finite for {bad} steps in a row (lr {lr} too high?); "
                                        f"the last good checkpoint is {path}")
                continue
            bad = 0
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, lr_decay)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(opt)
            scaler.update()
            if ema is not None and (scale_before is None or scaler.get_scale() >= scale_before):
                ema_update(ema_params, params, ema_rate)
            step += 1
            if step % log_every == 0 or step == steps:
                rate = (step - step0) / max(time.time() - t0, 1e-9)
                row = {"loss": float(loss.detach()), **logs}
                writer.writerow([step] + [f"{v:.5g}" for v in row.values()] + [f"{rate:.3f}"])
                log_file.flush()
                print(f"[{label}] step {step}/{steps} " + " ".join(f"{k} {v:.4f}" for k, v in row.items())
                      + f" | {rate:.2f} step/s | elapsed {format_time(time.time() - t0)}"
                      + f" | ETA {format_time((steps - step) / rate)}", flush=True)
            if step % ckpt_every == 0:
                save()
    except KeyboardInterrupt:
        save()
        print(f"\n[{label}] interrupted: saved step {step} to {path}; continue with --resume", flush=True)
        sys.exit(130)
    finally:
        log_file.close()
    save()
    if world > 1:
        check_in_sync(model, label, world)
    return model, ema


def check_in_sync(model, label, world):
    """All ranks must hold identical parameters after training (DDP all-reduces gradients)."""
    import torch.distributed as tdist
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainingError(f"{label}: parameters differ across the {world} ranks after training")
    print(f"[{label}] parameters identical on all {world} ranks", flush=True)


# ---------------------------------------------------------------------------------------------------
# DDPM and classifier
# ---------------------------------------------------------------------------------------------------

def draw_t_noise(gen, x, num_steps, part):
    """t ~ U{0..T-1} and ε for the global batch x (identical on every rank), then this rank's slice."""
    t = torch.randint(0, num_steps, (x.shape[0],), generator=gen).to(x.device)
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    return x[part], t[part], noise[part]


def ddpm_loss(diffusion, num_classes=0, cfg_dropout=0.0):
    """L_hybrid; with num_classes > 0 the U-Net sees the label, replaced by the null label `num_classes` with
    probability cfg_dropout (classifier-free guidance training [CFG], [ZSI] App. J)."""
    def loss_fn(model, x, y, gen, part=slice(None)):
        x, t, noise = draw_t_noise(gen, x, diffusion.num_steps, part)
        kwargs = {}
        if num_classes:
            drop = torch.rand(y.shape[0], generator=gen).to(y.device) < cfg_dropout
            kwargs["y"] = torch.where(drop, torch.full_like(y, num_classes), y)[part]
        losses = diffusion.training_losses(model, x, t, noise, model_kwargs=kwargs)
        return losses["loss"].mean(), dict(mse=float(losses["mse"].mean().detach()),
                                           vb=float(losses["vb"].mean().detach()))
    return loss_fn


def classifier_loss(diffusion):
    def loss_fn(model, x, y, gen, part=slice(None)):
        x, t, noise = draw_t_noise(gen, x, diffusion.num_steps, part)
        loss, logits = noisy_classifier_loss(model, diffusion, x, y[part], t=t, noise=noise)
        return loss, dict(acc=float((logits.argmax(1) == y[part]).float().mean()))
    return loss_fn


def train_ddpm(config, out, args, device, data, dist=(0, 1), beside=None):
    from evaluate import circle_metrics, write_report
    from sample import generate, sampling_chain
    images, labels = data
    if dist[0] == 0:
        save_grid(images[:64], out / "train_examples.png", nrow=8, scale=max(1, 128 // images.shape[1]))
    torch.manual_seed(config["train"]["seed"])          # the initialisation
    model, diffusion = ckpt_io.build_ddpm(config)
    print(f"[ddpm] {config.get('arch', 'unet')} {count_parameters(model) / 1e6:.2f}M parameters, "
          f"{len(images)} training images "
          f"{images.shape[1]}x{images.shape[2]}, T={diffusion.num_steps}, device {device}", flush=True)
    tc = config["train"]
    model = model.to(device)
    batches = Batches(images, labels, tc["batch_size"], flip=tc["flip"], seed=tc["seed"])
    num_classes = max(ckpt_io.backbone_config(config)["num_classes"] - 1, 0)
    try:
        _, ema = fit("ddpm", model, ddpm_loss(diffusion, num_classes, tc.get("cfg_dropout", 0.0)), batches,
                     steps=tc["steps"], lr=tc["lr"], ema_rate=tc["ema"], amp=tc["amp"], device=device,
                     path=out / "ddpm.pt", lr_decay=tc.get("lr_decay", 0.0),
                     config=dict(config, seed=tc["seed"]), resume=args.resume,
                     log_every=args.log_every, ckpt_every=args.ckpt_every, dist=dist, before_step=beside)
        if beside is not None:
            beside.finish()     # a DDPM shorter than the overlap: wait for the classifier here
    finally:
        if beside is not None:
            beside.stop()       # Ctrl-C, SIGTERM or an error: the classifier saves and exits too
    if args.eval_samples > 0 and dist[0] == 0:
        ema.eval()
        samples = generate(ema, sampling_chain(diffusion, config).respace(config["sample_steps"]), args.eval_samples,
                           amp=tc["amp"], device=device, seed=tc["seed"], channels_last=True)   # CPU: 64 per batch
        np.savez_compressed(out / "ddpm_samples.npz", images=samples)
        save_grid(samples[:100], out / "ddpm_samples.png", nrow=10, scale=max(1, 128 // samples.shape[1]))
        if config["data"]["name"] == "circles":
            m = circle_metrics(samples)
            report = dict(samples=len(samples), one_circle=1 - m["invalid"], one_circle_at_border=
                          float(((m["x"] < 0.2) | (m["x"] > 0.8)).sum() / len(samples)),
                          in_middle=m["accuracy"], zero_circles=m["zero_circles"], multi_circles=m["multi_circles"],
                          one_circle_any_size=1 - m["invalid_any_size"])
            write_report(report, out, "Unguided EMA samples after DDPM training", stem="ddpm_report")
            print(f"[ddpm] unguided samples: {report['one_circle'] * 100:.1f}% one circle, "
                  f"{report['one_circle_at_border'] * 100:.1f}% one circle at a border", flush=True)


def train_classifier(config, out, args, device, name, data, dist=(0, 1)):
    images, labels = data
    _, diffusion = ckpt_io.build_ddpm(config)
    ctrain = config["classifier_train"]
    torch.manual_seed(ctrain["seed"])
    model = ckpt_io.build_classifier(config).to(device)
    sn = " with spectral norm (lipschitz %g)" % config["classifier"]["lipschitz"] if config["classifier"]["spectral_norm"] else ""
    intensity = ctrain.get("intensity", 1.0)           # absent from configs written before session 8
    print(f"[{name}] classifier {count_parameters(model) / 1e6:.2f}M parameters{sn}, "
          f"{ctrain['steps']} steps, augment {ctrain['augment']}"
          + (f", intensity U({intensity:g}, 1)" if intensity < 1 else ""), flush=True)
    augment = ctrain["augment"]
    batches = Batches(images, labels, ctrain["batch_size"], flip=augment != "none", flip_labels=augment == "mirror",
                      seed=ctrain["seed"], intensity=intensity)
    clf_config = dict(data=config["data"], diffusion=config["diffusion"], classifier=config["classifier"],
                      train=ctrain, seed=ctrain["seed"])
    model, _ = fit("classifier", model, classifier_loss(diffusion), batches, label=name, steps=ctrain["steps"], lr=ctrain["lr"],
                   ema_rate=None, amp=False, device=device, path=out / f"{name}.pt", config=clf_config,
                   resume=args.resume, log_every=args.log_every, ckpt_every=args.ckpt_every, dist=dist)
    if dist[0] != 0:
        return
    if converge_spectral_norm(model):   # the saved u, v must match the final weights (see its docstring)
        state = ckpt_io.load(out / f"{name}.pt")
        state["model"] = model.state_dict()
        ckpt_io.save_atomic(state, out / f"{name}.pt")
    ckpt_io.write_json(clf_config, out / f"{name}.json")
    if config["data"]["name"] == "circles":
        from evaluate import classifier_heatmap, plot_heatmaps
        model.eval()
        heat, coords = classifier_heatmap(model, config["data"]["image_size"], config["data"]["radius"], device=device)
        plot_heatmaps({f"{name}: p(right | circle at x, y), t=0": heat}, coords, out / f"{name}_heatmap.png",
                      config["data"]["image_size"])


# Measured on the 2-core CPU (RESULTS.md, session 10): side by side on one thread each, the cpu preset's DDPM
# (batch 32) makes 0.85 steps per classifier step (batch 64), so the classifier's 800 steps end near DDPM step 680.
OVERLAP_RATIO = 0.85


def overlap_steps(args, config, device, world, what):
    """DDPM steps during which the classifier trains beside it (0 = one after the other)."""
    on = args.overlap
    if on is None:
        on = device.type == "cpu" and world == 1 and torch.get_num_threads() >= 2
    if not on or what != ("ddpm", "classifier"):
        return 0
    return max(1, round(OVERLAP_RATIO * config["classifier_train"]["steps"]))


class ClassifierBeside:
    """The guidance classifier trained in a second process during the DDPM's first `until` steps (CPU).

    The classifier does not need the DDPM (it learns p(y | x_t, t) on q_sample of the data), and on a 2-core
    CPU two one-thread jobs do 1.2-1.3x the work of one two-thread job (RESULTS.md). The DDPM takes its threads
    back at step `until`, waiting for the classifier if need be, never "when the classifier ends": thread
    count changes float rounding, and a timing-dependent switch would make the DDPM differ run to run.
    Called by fit before every DDPM step; started on the first call below `until` (also on a resumed run).
    """

    def __init__(self, config, out, args, name, until, threads):
        self.job = (config, out, args, name, max(1, threads // 2))
        self.until, self.threads = until, threads
        self.proc, self.done = None, False

    def __call__(self, step):
        if step >= self.until:
            self.finish()
        elif self.proc is None and not self.done:
            import multiprocessing
            self.proc = multiprocessing.get_context("spawn").Process(target=classifier_process, args=self.job)
            self.proc.start()
            torch.set_num_threads(max(1, self.threads - self.threads // 2))

    def finish(self):
        if self.proc is None:
            return
        self.proc.join()
        code, self.proc = self.proc.exitcode, None
        torch.set_num_threads(self.threads)
        self.done = code == 0
        if not self.done:   # its error is printed above; train.py trains it after the DDPM instead
            print(f"[ddpm] the classifier process stopped with exit code {code}; it will train after the DDPM",
                  flush=True)

    def stop(self):
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()   # SIGTERM: it saves its checkpoint and exits
            self.proc.join()


def classifier_process(config, out, args, name, threads):
    """ClassifierBeside's second process: train_classifier on `threads` threads."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches it through the DDPM process, once
    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(threads)
    try:
        train_classifier(config, out, args, torch.device("cpu"), name, load_data(config["data"]))
    except (DataError, ckpt_io.CheckpointError, TrainingError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def setup_distributed(device):
    """(rank, world, device) under torchrun (WORLD_SIZE > 1: NCCL on GPUs, gloo on CPU), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as tdist
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DataError(f"torchrun started process {local_rank} on this node but only {torch.cuda.device_count()} "
                            f"GPU(s) are visible: use --nproc_per_node {torch.cuda.device_count()}, or --device cpu "
                            f"for CPU processes (gloo)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")   # rank 0 alone prints progress
    return rank, world, device


def celeba_splits(config):
    """Full train split (no --subset) and the valid split, as (images, labels, positions) each."""
    d = config["data"]
    out = []
    for split in ("train", "valid"):
        paths, labels, _, _, positions = celeba_split(d["path"], d["attrs"], split)
        out.append((load_images(paths, d["image_size"]), labels, positions))
    return out


def evaluator_path(out, config):
    return out / f"evaluator_{'-'.join(a.replace('/', '_') for a in config['data']['attrs'])}.pt"


def train_evaluator_cmd(config, out, args, device):
    """Train, select and calibrate the evaluation classifier of the run's attribute; evaluator_<attr>.pt."""
    from evaluate import write_report
    from filtering import train_evaluator
    (train_x, train_y, _), (val_x, val_y, _) = celeba_splits(config)
    preset = PRESETS[args.preset]
    width = args.eval_width or preset["eval_width"]
    model, report = train_evaluator(train_x, train_y, val_x, val_y, steps=args.eval_steps or preset["eval_steps"],
                                    width=width, seed=args.seed, device=device,
                                    log=lambda m: print(m, flush=True))
    path = evaluator_path(out, config)
    cfg = dict(evaluator=dict(width=width, num_classes=model.head[1].out_features), data=config["data"],
               report=report)
    ckpt_io.save_atomic(dict(kind="evaluator", config=cfg, model=model.state_dict()), path)
    write_report(report, out, f"Evaluation classifier {path.name}", stem=path.stem)
    print(f"[evaluator] val accuracy {report['val_accuracy']:.4f}, T = {report['temperature']:.3f}, ECE "
          f"{report['ece_before']:.4f} -> {report['ece_after']:.4f}: {path}", flush=True)


def filter_cmd(config, out, args, device):
    """App. D: τ1 classifier, τ2 ensemble, top-k by the evaluation classifier; writes the index files."""
    from evaluate import plot_histograms, write_report
    from filtering import extreme_filter
    path = evaluator_path(out, config)
    if not path.exists():
        raise DataError(f"{path} is missing: train the evaluation classifier first with --what evaluator")
    evaluator, _ = ckpt_io.load_evaluator(path, device)
    (train_x, train_y, positions), (val_x, val_y, _) = celeba_splits(config)
    if train_y.max() > 1:
        raise DataError("--what filter works on one (binary) attribute; intersect index files for two")
    sizes = parse_ints(args.train_size, "--train-size")
    preset = PRESETS[args.preset]
    result = extreme_filter(train_x, train_y, val_x, val_y, evaluator, sizes, tau1=args.tau1, tau2=args.tau2,
                            members=args.members, seed=args.seed, device=device,
                            log=lambda m: print(m, flush=True), steps=args.eval_steps or preset["eval_steps"],
                            width=args.eval_width or preset["eval_width"])
    stem = path.stem.replace("evaluator_", "subset_")
    for size, idx in result["indices"].items():
        (out / f"{stem}_{size}.txt").write_text("".join(f"{p}\n" for p in positions[idx]))
    kept = {f"{size} kept": result["p1"][np.isin(result["stage2"], idx)] for size, idx in result["indices"].items()}
    plot_histograms(kept, out / f"{stem}_scores.png", "evaluation classifier p(class 1)", log=True, marks=())
    write_report(dict(result["counts"], tau1=args.tau1, tau2=args.tau2, members=args.members), out,
                 f"Extreme-subset filter (App. D) for {config['data']['attrs']}", stem=f"{stem}_report")
    print(f"[filter] counts {result['counts']} -> {out}/{stem}_<size>.txt", flush=True)


def new_folder_root(path):
    """The outermost of `path` and its parents that does not exist yet (what mkdir(parents=True) creates), or None."""
    root = None
    for p in (path, *path.parents):
        if p.exists():
            break
        root = p
    return root


def discard_unfinished(root, out):
    """After a failed run: delete the folders it created (`root`, holding the run folder `out`) unless a checkpoint
    in `out` can continue it with --resume, so a failed start leaves no empty or half-written run folder."""
    if root is not None and root.exists() and not any(out.glob("*.pt")):
        shutil.rmtree(root, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt   # SIGTERM (a scheduler's preemption) saves like Ctrl-C


def main(argv=None):
    args = parse_args(argv)
    fresh = out = None   # the outermost run folder this call creates (rank 0), removed again if the run fails early
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)   # also when started with SIGINT ignored (a `cmd &` in a script)
    try:
        rank, world, device = setup_distributed(resolve_device(args.device))
        if args.amp is None:
            args.amp = amp_default(device)
        out = Path(args.out or f"runs/{args.data}")
        name = args.classifier_name or ("classifier_sn" if args.spectral_norm else "classifier")
        what = ("ddpm", "classifier") if args.what == "all" else (args.what,)
        saved = None
        if "ddpm" not in what and (out / "config.json").exists():
            saved = json.loads((out / "config.json").read_text())
            args.image_size = saved["data"]["image_size"]
        config = build_config(args)
        if saved is not None:  # a classifier added to a run shares the DDPM's data and chain
            config.update(data=saved["data"], diffusion=saved["diffusion"])
        check_run(args, config, device, world, what)
        for kind, path in (("ddpm", out / "ddpm.pt"), ("classifier", out / f"{name}.pt")):
            if kind in what and path.exists() and not (args.resume or args.overwrite):
                raise DataError(f"{path} exists; pass --resume to continue it or --overwrite to start afresh "
                                f"(or --out NEW_DIR)")
        if args.what in ("evaluator", "filter"):
            fresh = new_folder_root(out)
            out.mkdir(parents=True, exist_ok=True)
            (train_evaluator_cmd if args.what == "evaluator" else filter_cmd)(config, out, args, device)
            print(f"done: {out}", flush=True)
            return
        data = load_data(config["data"])  # fail on bad data before any work
        config["classifier"]["num_classes"] = max(2, int(data[1].max()) + 1)
        if args.cfg_dropout > 0:   # K classes + the null label K
            ckpt_io.backbone_config(config)["num_classes"] = config["classifier"]["num_classes"] + 1
        if rank == 0:
            fresh = new_folder_root(out)
            out.mkdir(parents=True, exist_ok=True)
        beside = None
        if "ddpm" in what:
            config["dc_prior"] = channel_mean_stats(data[0])   # saved with the DDPM; read by sample.sampling_chain
            config["train"]["overlap_steps"] = overlap_steps(args, config, device, world, what)
            if config["train"]["overlap_steps"]:
                beside = ClassifierBeside(config, out, args, name, config["train"]["overlap_steps"],
                                          torch.get_num_threads())
            if rank == 0:
                ckpt_io.write_json(config, out / "config.json")
            train_ddpm(config, out, args, device, data, (rank, world), beside)
        if "classifier" in what and not (beside is not None and beside.done):
            train_classifier(config, out, args, device, name, data, (rank, world))
        if world > 1:
            torch.distributed.destroy_process_group()
    except (DataError, ckpt_io.CheckpointError, TrainingError, ValueError) as e:
        discard_unfinished(fresh, out)
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except BaseException:   # a crash, Ctrl-C, SIGTERM: the same rule
        discard_unfinished(fresh, out)
        raise
    print(f"done: {out}", flush=True)


if __name__ == "__main__":
    main()
