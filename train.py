"""Train the DDPM and the noisy guidance classifier(s) of [ZSI]; one run folder holds everything.

  python train.py --data circles                                # CPU preset: DDPM, then the classifier
  python train.py --data circles --what classifier --spectral-norm   # add an SN classifier to the run
  python train.py --data folder --data-dir PNGS --preset paper  # the paper's hyperparameters (GPU)

Writes into --out (default runs/<data>): config.json (data, diffusion, U-Net and training settings),
ddpm.pt (model, EMA, optimizer, scaler, step, RNG), ddpm_loss.csv, ddpm_samples.png/.npz and
ddpm_report.md (unguided EMA samples), train_examples.png, and per classifier <name>.pt, <name>.json,
<name>_loss.csv, <name>_heatmap.png (circles). A killed run continues with --resume; Ctrl-C saves first.

The DDPM loss is L_hybrid [IDDPM eq. 16] with t ~ U{0..T-1}; the classifier loss is the cross-entropy of
p(y | x_t, t) on the same chain (EXPERIMENTS.md §2.2, §3.2). Presets are the paper's table (EXPERIMENTS.md
§2.2, §3, §10) or a CPU preset chosen by measurement on a 2-core laptop-class CPU (RESULTS.md).
"""
import argparse
import copy
import csv
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import checkpoint as ckpt_io
from classifier import ClassifierConfig, default_channel_mult, noisy_classifier_loss
from data import Batches, DataError, circles_dataset, load_image_folder, save_grid
from ddpm import DiffusionConfig
from unet import UNetConfig, amp_default, autocast, count_parameters

# ---------------------------------------------------------------------------------------------------
# Presets: every default in one place. "paper" = EXPERIMENTS.md §2.2 (DDPM), §3 (classifier), §10 (circles).
# ---------------------------------------------------------------------------------------------------

PRESETS = {
    "cpu": dict(
        image_size=32,            # circles at 32x32 (paper: 64): 4x fewer pixels, same radius-2 disc
        unet=dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,),
                  num_heads=4),   # 0.72M params, ~640 ms/step at batch 64 (fp32, 2 cores); see RESULTS.md
        steps=1100, batch_size=64, lr=5e-4, ema=0.995,   # short run: larger lr, faster EMA
        clf=dict(model_channels=16, num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2, 2)),
        clf_steps=800, clf_batch_size=64, clf_lr=3e-4,
        sample_steps=64),
    "paper": dict(
        image_size=64,
        unet=dict(),              # UNetConfig defaults = the paper's 121M model
        steps=250_000, batch_size=64, lr=1e-4, ema=0.9999,
        clf=dict(model_channels=128, num_res_blocks=2, attention_resolutions=(32, 16, 8)),
        clf_steps=150_000, clf_batch_size=64, clf_lr=3e-4,
        sample_steps=250),
}
PAPER_CIRCLES = dict(steps=30_000, clf=dict(model_channels=64, num_res_blocks=2, attention_resolutions=(8,)),
                     clf_steps=3_000, sample_steps=64)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a persistently non-finite loss); printed as one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--data", default="circles", help="dataset: circles | folder (PNG/JPEG files {label}_{k}.png)")
    g.add_argument("--data-dir", default=None, help="image folder for --data folder")
    g.add_argument("--preset", choices=PRESETS, default="cpu", help="cpu: minutes on a laptop; paper: [ZSI] values")
    g.add_argument("--what", choices=("all", "ddpm", "classifier"), default="all", help="what to train")
    g.add_argument("--out", default=None, help="run folder (default runs/<data>)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds checkpoints")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, batches and noise")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
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
    g.add_argument("--batch-size", type=int, default=None, help="batch size (default: preset)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate, no weight decay")
    g.add_argument("--ema", type=float, default=None, help="EMA rate of the sampled weights")
    g.add_argument("--diffusion-steps", type=int, default=4000, help="T of the cosine chain")
    g.add_argument("--vb-scale", type=float, default=1.0,
                   help="weight of L_t in L_hybrid: 1 = official configs, T/1000 = paper text's λ=0.001")
    g.add_argument("--model-channels", type=int, default=None, help="U-Net base width (default: preset)")
    g.add_argument("--channel-mult", default=None, help="U-Net width multipliers per level, e.g. 1,2,2")
    g.add_argument("--num-res-blocks", type=int, default=None, help="U-Net residual blocks per level")
    g.add_argument("--attention-resolutions", default=None, help="feature-map sizes with attention, e.g. 16,8")
    g.add_argument("--sample-steps", type=int, default=None, help="respaced steps for sampling (default: preset)")
    g.add_argument("--eval-samples", type=int, default=256, help="unguided EMA samples drawn after training")
    g = p.add_argument_group("classifier")
    g.add_argument("--classifier-name", default=None, help="file stem in the run (default classifier / classifier_sn)")
    g.add_argument("--classifier-steps", type=int, default=None, help="optimizer steps (default: preset)")
    g.add_argument("--classifier-batch-size", type=int, default=None, help="batch size (default: preset)")
    g.add_argument("--classifier-lr", type=float, default=None, help="AdamW learning rate")
    g.add_argument("--classifier-width", type=int, default=None, help="base width (default: preset)")
    g.add_argument("--spectral-norm", action="store_true", help="spectral normalisation of conv/linear weights")
    g.add_argument("--lipschitz", type=float, default=0.5, help="per-layer Lipschitz factor with --spectral-norm")
    g.add_argument("--classifier-augment", choices=("none", "flip", "mirror"), default="none",
                   help="none (official for circles); flip (h-flip, CelebA); mirror (h-flip and swap labels 0/1)")
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
    elif args.data == "folder":
        if not args.data_dir:
            raise DataError("--data folder needs --data-dir DIR with PNG/JPEG files named {label}_{k}.png")
        data = dict(name="folder", image_size=image_size, path=str(args.data_dir))
    else:
        raise DataError(f"--data {args.data!r} is not a dataset; choose circles or folder")
    unet = dict(preset["unet"], image_size=image_size)
    if args.model_channels:
        unet["model_channels"] = args.model_channels
    if args.channel_mult:
        unet["channel_mult"] = parse_ints(args.channel_mult, "--channel-mult", float)
    if args.num_res_blocks:
        unet["num_res_blocks"] = args.num_res_blocks
    if args.attention_resolutions:
        unet["attention_resolutions"] = parse_ints(args.attention_resolutions, "--attention-resolutions")
    unet_cfg = UNetConfig(**unet)
    clf = dict(preset["clf"], image_size=image_size, channel_mult=preset["clf"].get(
        "channel_mult", default_channel_mult(image_size)))
    if args.classifier_width:
        clf["model_channels"] = args.classifier_width
    clf_cfg = ClassifierConfig(**clf, spectral_norm=args.spectral_norm, lipschitz=args.lipschitz)
    if not args.lipschitz > 0:
        raise DataError(f"--lipschitz must be a positive number, got {args.lipschitz}")
    for net, mult in (("U-Net", unet_cfg.channel_mult), ("classifier", clf_cfg.channel_mult)):
        if image_size % 2 ** (len(mult) - 1):
            raise DataError(f"--image-size {image_size} is not divisible by {2 ** (len(mult) - 1)}, the total "
                            f"downsampling of the {net} (channel_mult {tuple(mult)}); pick a multiple of it")
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--classifier-steps", args.classifier_steps),
                        ("--classifier-batch-size", args.classifier_batch_size)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be a positive integer, got {value}")
    return dict(
        data=data,
        diffusion=asdict(DiffusionConfig(num_steps=args.diffusion_steps, vb_scale=args.vb_scale)),
        unet=asdict(unet_cfg),
        train=dict(steps=args.steps or preset["steps"], batch_size=args.batch_size or preset["batch_size"],
                   lr=args.lr or preset["lr"], ema=args.ema or preset["ema"], amp=args.amp, seed=args.seed,
                   flip=True, preset=args.preset),
        sample_steps=args.sample_steps or preset["sample_steps"],
        classifier=asdict(clf_cfg),
        classifier_train=dict(steps=args.classifier_steps or preset["clf_steps"],
                              batch_size=args.classifier_batch_size or preset["clf_batch_size"],
                              lr=args.classifier_lr or preset["clf_lr"], seed=args.seed,
                              augment=args.classifier_augment),
    )


def load_data(data_cfg):
    """(uint8 images [N, H, W, 3], labels [N]) of the training set."""
    if data_cfg["name"] == "circles":
        images, labels, _ = circles_dataset(data_cfg["image_size"], data_cfg["radius"], data_cfg["delta"],
                                            seed=data_cfg["seed"])
        return images, labels
    images, labels, _ = load_image_folder(data_cfg["path"], data_cfg["image_size"])
    return images, labels


# ---------------------------------------------------------------------------------------------------
# The training loop shared by the DDPM and the classifier
# ---------------------------------------------------------------------------------------------------

def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def fit(kind, model, loss_fn, batches, *, steps, lr, ema_rate, amp, device, path, config, resume,
        log_every=100, ckpt_every=500, max_bad_steps=20, label=None):
    """AdamW (no weight decay) with optional EMA, autocast and GradScaler; checkpoints `path` atomically.

    loss_fn(model, x, y, generator) -> (mean loss, dict of floats to log). Returns (model, ema).
    Resumes model, EMA, optimizer, scaler, RNG and step from `path` when `resume` and it exists.
    kind ("ddpm" | "classifier") is stored in the checkpoint; label prefixes the progress lines.
    """
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
    elif log_path.exists():
        log_path.unlink()

    def save():
        ckpt_io.save_atomic(dict(kind=kind, config=config, step=step, model=model.state_dict(),
                                 ema=ema.state_dict() if ema is not None else None, opt=opt.state_dict(),
                                 scaler=scaler.state_dict(),
                                 rng=dict(loss=gen.get_state(), batches=batches.generator.get_state())), path)

    ema_params = [p for p in ema.parameters()] if ema is not None else []
    params = [p for p in model.parameters()]
    model.train()
    t0, step0, bad, logs = time.time(), step, 0, {}
    log_file = open(log_path, "a", newline="")
    writer = csv.writer(log_file)
    try:
        while step < steps:
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                loss, logs = loss_fn(model, x, y, gen)
            if not torch.isfinite(loss):
                bad += 1
                if bad >= max_bad_steps:
                    raise TrainingError(f"{label}: loss was not finite for {bad} steps in a row (lr {lr} too high?); "
                                        f"the last good checkpoint is {path}")
                continue
            bad = 0
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scale_before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(opt)
            scaler.update()
            if ema is not None and (scale_before is None or scaler.get_scale() >= scale_before):
                torch._foreach_lerp_(ema_params, params, 1 - ema_rate)   # ema <- rate·ema + (1-rate)·θ
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
    return model, ema


# ---------------------------------------------------------------------------------------------------
# DDPM and classifier
# ---------------------------------------------------------------------------------------------------

def ddpm_loss(diffusion):
    def loss_fn(model, x, y, gen):
        t = torch.randint(0, diffusion.num_steps, (x.shape[0],), generator=gen).to(x.device)
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        losses = diffusion.training_losses(model, x, t, noise)
        return losses["loss"].mean(), dict(mse=float(losses["mse"].mean().detach()),
                                           vb=float(losses["vb"].mean().detach()))
    return loss_fn


def classifier_loss(diffusion):
    def loss_fn(model, x, y, gen):
        loss, logits = noisy_classifier_loss(model, diffusion, x, y, generator=gen)
        return loss, dict(acc=float((logits.argmax(1) == y).float().mean()))
    return loss_fn


def train_ddpm(config, out, args, device):
    from evaluate import circle_metrics, write_report
    from sample import generate
    images, labels = load_data(config["data"])
    save_grid(images[:64], out / "train_examples.png", nrow=8, scale=max(1, 128 // images.shape[1]))
    torch.manual_seed(config["train"]["seed"])          # the initialisation
    model, diffusion = ckpt_io.build_ddpm(config)
    print(f"[ddpm] U-Net {count_parameters(model) / 1e6:.2f}M parameters, {len(images)} training images "
          f"{images.shape[1]}x{images.shape[2]}, T={diffusion.num_steps}, device {device}", flush=True)
    tc = config["train"]
    model = model.to(device)
    batches = Batches(images, labels, tc["batch_size"], flip=tc["flip"], seed=tc["seed"])
    _, ema = fit("ddpm", model, ddpm_loss(diffusion), batches, steps=tc["steps"], lr=tc["lr"],
                 ema_rate=tc["ema"], amp=tc["amp"], device=device, path=out / "ddpm.pt",
                 config=dict(config, seed=tc["seed"]), resume=args.resume,
                 log_every=args.log_every, ckpt_every=args.ckpt_every)
    if args.eval_samples > 0:
        ema.eval()
        samples = generate(ema, diffusion.respace(config["sample_steps"]), args.eval_samples,
                           batch_size=min(args.eval_samples, 256), amp=tc["amp"], device=device, seed=tc["seed"])
        np.savez_compressed(out / "ddpm_samples.npz", images=samples)
        save_grid(samples[:100], out / "ddpm_samples.png", nrow=10, scale=max(1, 128 // samples.shape[1]))
        if config["data"]["name"] == "circles":
            m = circle_metrics(samples)
            report = dict(samples=len(samples), one_circle=1 - m["invalid"], one_circle_at_border=
                          float(((m["x"] < 0.2) | (m["x"] > 0.8)).sum() / len(samples)),
                          in_middle=m["accuracy"], zero_circles=m["zero_circles"], multi_circles=m["multi_circles"])
            write_report(report, out, "Unguided EMA samples after DDPM training", stem="ddpm_report")
            print(f"[ddpm] unguided samples: {report['one_circle'] * 100:.1f}% one circle, "
                  f"{report['one_circle_at_border'] * 100:.1f}% one circle at a border", flush=True)


def train_classifier(config, out, args, device, name):
    images, labels = load_data(config["data"])
    _, diffusion = ckpt_io.build_ddpm(config)
    ctrain = config["classifier_train"]
    torch.manual_seed(ctrain["seed"])
    model = ckpt_io.build_classifier(config).to(device)
    sn = " with spectral norm (lipschitz %g)" % config["classifier"]["lipschitz"] if config["classifier"]["spectral_norm"] else ""
    print(f"[{name}] classifier {count_parameters(model) / 1e6:.2f}M parameters{sn}, "
          f"{ctrain['steps']} steps, augment {ctrain['augment']}", flush=True)
    augment = ctrain["augment"]
    batches = Batches(images, labels, ctrain["batch_size"], flip=augment != "none", flip_labels=augment == "mirror",
                      seed=ctrain["seed"])
    clf_config = dict(data=config["data"], diffusion=config["diffusion"], classifier=config["classifier"],
                      train=ctrain, seed=ctrain["seed"])
    model, _ = fit("classifier", model, classifier_loss(diffusion), batches, label=name, steps=ctrain["steps"], lr=ctrain["lr"],
                   ema_rate=None, amp=False, device=device, path=out / f"{name}.pt", config=clf_config,
                   resume=args.resume, log_every=args.log_every, ckpt_every=args.ckpt_every)
    ckpt_io.write_json(clf_config, out / f"{name}.json")
    if config["data"]["name"] == "circles":
        from evaluate import classifier_heatmap, plot_heatmaps
        model.eval()
        heat, coords = classifier_heatmap(model, config["data"]["image_size"], config["data"]["radius"], device=device)
        plot_heatmaps({f"{name}: p(right | circle at x, y), t=0": heat}, coords, out / f"{name}_heatmap.png",
                      config["data"]["image_size"])


def main(argv=None):
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
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
        for kind, path in (("ddpm", out / "ddpm.pt"), ("classifier", out / f"{name}.pt")):
            if kind in what and path.exists() and not (args.resume or args.overwrite):
                raise DataError(f"{path} exists; pass --resume to continue it or --overwrite to start afresh "
                                f"(or --out NEW_DIR)")
        load_data(config["data"])  # fail on bad data before any work
        out.mkdir(parents=True, exist_ok=True)
        if "ddpm" in what:
            ckpt_io.write_json(config, out / "config.json")
            train_ddpm(config, out, args, device)
        if "classifier" in what:
            train_classifier(config, out, args, device, name)
    except (DataError, ckpt_io.CheckpointError, TrainingError, ValueError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"done: {out}", flush=True)


if __name__ == "__main__":
    main()
