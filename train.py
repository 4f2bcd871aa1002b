"""Train the DDPM and the noisy guidance classifier(s) of [ZSI]; one run folder holds everything.

  python train.py --data circles                                # CPU preset: the DDPM and the classifier
  python train.py --data circles --what classifier --spectral-norm   # add an SN classifier to the run
  python train.py --data folder --data-dir PNGS --preset paper  # the paper's hyperparameters (GPU)

Writes into --out (default runs/<data>): config.json (data, diffusion, U-Net and training settings),
ddpm.pt (model, EMA, optimizer, scaler, step, RNG), ddpm_loss.csv, ddpm_samples.png/.npz and
ddpm_report.md (unguided EMA samples), train_examples.png, and per classifier <name>.pt, <name>.json,
<name>_loss.csv, <name>_heatmap.png (circles). A killed run continues with --resume; Ctrl-C saves first.
CelebA also: `--what evaluator` (appendix/evaluator.py's clean classifier) and `--what filter` (App. D subsets).

The DDPM loss is L_hybrid [IDDPM eq. 16] with t ~ U{0..T-1}; the classifier loss is the cross-entropy of
p(y | x_t, t) on the same chain (docs/paper_notes.md §2.2, §3.2). Flags, presets and checks: config.py.
"""
import copy
import csv
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from infra import checkpoint as ckpt_io
import config as run_config
from classifier import converge_spectral_norm, noisy_classifier_loss
from cli import TrainingError, format_time, one_line_errors
from beyond.cpu_preset import Additions, channel_mean_stats, dc_prior
from data import LABEL_UNDER_FLIP, Batches, check_classes, save_grid, training_sets
from infra.device import (amp_default, autocast, check_in_sync, global_batch_numbers, grad_scaler, resolve_device,
                    setup_distributed)
from evaluate import classifier_heatmap, plot_heatmaps, save_samples, unguided_circles_report, write_report
from appendix.evaluator import filter_run, filter_targets, train_evaluator_run
from infra.generate import generate, sampling_model
from beyond.mnist_eval import DIGIT_EVALUATOR, train_digit_evaluator, unguided_report
from unet import count_parameters


# ---------------------------------------------------------------------------------------------------
# The training loop shared by the DDPM and the classifier
# ---------------------------------------------------------------------------------------------------

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

    loss_fn(model, x, y, generator, part) -> (mean loss, dict of floats to log), part = this rank's slice of the
    batch. Returns (model, ema).
    Resumes model, EMA, optimizer, scaler, RNG and step from `path` when `resume` and it exists.
    kind ("ddpm" | "classifier") is stored in the checkpoint; label prefixes the progress lines.
    dist = (rank, world) under torchrun: every rank draws the same global batch (and noise) and trains on
    its slice through DistributedDataParallel, so N processes take the same steps as one process with the
    same global --batch-size; rank 0 alone writes checkpoints and logs (the global batch's numbers).
    before_step(step), if given, is called before every step (ClassifierBeside switches threads there).
    """
    rank, world = dist
    label = label or kind
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ema = copy.deepcopy(model).requires_grad_(False) if ema_rate else None
    scaler = grad_scaler(device, amp)
    gen = torch.Generator().manual_seed(config["seed"] + 1)
    step, log_path = 0, path.with_name(path.stem + "_loss.csv")
    if resume and path.exists():
        state = ckpt_io.load(path)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        if scaler.is_enabled() and state.get("scaler"):   # {} when saved with AMP off: a fresh scale then
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["rng"]["loss"])
        batches.generator.set_state(state["rng"]["batches"])
        step = state["step"]
        if rank == 0:   # the log continues from the checkpoint's step, each step once
            ckpt_io.truncate_log(log_path, step)
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
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    part = rank_part(batches.batch_size, rank, world)
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
            finite, loss_value, logs = global_batch_numbers(loss, logs, part.stop - part.start, world)
            if not finite:
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
                row = {"loss": loss_value, **logs}
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


def rank_part(batch_size, rank, world):
    """This rank's rows of the global batch (--batch-size is global: the paper preset's 128 = 64 on each of 2 GPUs)."""
    return slice(rank * batch_size // world, (rank + 1) * batch_size // world)


def draw_t_noise(gen, x, num_timesteps, part):
    """t ~ U{0..T-1} and ε for the global batch x (identical on every rank), then this rank's slice."""
    t = torch.randint(0, num_timesteps, (x.shape[0],), generator=gen).to(x.device)
    noise = torch.randn(x.shape, generator=gen).to(x.device)
    return x[part], t[part], noise[part]


def ddpm_loss(diffusion, num_classes=0, cfg_dropout=0.0):
    """L_hybrid; with num_classes > 0 the U-Net sees the label, replaced by the null label `num_classes` with
    probability cfg_dropout (classifier-free guidance training [CFG], [ZSI] App. J)."""
    def loss_fn(model, x, y, gen, part=slice(None)):
        x, t, noise = draw_t_noise(gen, x, diffusion.num_timesteps, part)
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
        x, t, noise = draw_t_noise(gen, x, diffusion.num_timesteps, part)
        loss, logits = noisy_classifier_loss(model, diffusion, x, y[part], t=t, noise=noise)
        return loss, dict(acc=float((logits.argmax(1) == y[part]).float().mean()))
    return loss_fn


def train_ddpm(config, out, args, device, data, dist=(0, 1), beside=None):
    """The DDPM (EMA weights sampled), then `--eval-samples` unguided samples with their report."""
    images, labels = data
    if dist[0] == 0:
        save_grid(images[:64], out / "train_examples.png", nrow=8, scale=max(1, 128 // images.shape[1]))
    torch.manual_seed(config["train"]["seed"])          # the initialisation
    model, diffusion = ckpt_io.build_ddpm(config)
    print(f"[ddpm] {config.get('arch', 'unet')} {count_parameters(model) / 1e6:.2f}M parameters, "
          f"{len(images)} training images "
          f"{images.shape[1]}x{images.shape[2]}, T={diffusion.num_timesteps}, device {device}", flush=True)
    tc = config["train"]
    model = model.to(device)
    batches = Batches(images, labels, tc["batch_size"], seed=tc["seed"],
                      flip=LABEL_UNDER_FLIP[config["data"]["name"]] if tc["flip"] else None)
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
        chain = diffusion.respace(config["sample_steps"])     # unguided, with the run's DC correction (cpu_preset)
        net = Additions(dc_prior(config)).denoiser(sampling_model(ema, device, tc["amp"], channels_last=True), chain)
        samples = generate(net, chain, (ema.in_channels, ema.image_size, ema.image_size), args.eval_samples,
                           device=device, seed=tc["seed"])
        save_samples(out / "ddpm_samples.npz", samples)
        save_grid(samples[:100], out / "ddpm_samples.png", nrow=10, scale=max(1, 128 // samples.shape[1]))
        if config["data"]["name"] == "circles":
            report = dict(unguided_circles_report(samples), seed=tc["seed"])
            write_report(report, out, "Unguided EMA samples after DDPM training", stem="ddpm_report",
                         device=device, amp=tc["amp"])
            print(f"[ddpm] unguided samples: {report['one_circle'] * 100:.1f}% one circle, "
                  f"{report['one_circle_at_border'] * 100:.1f}% one circle at a border", flush=True)
        if config["data"]["name"] == "mnist":
            report = dict(unguided_report(samples, config["data"]), seed=tc["seed"])
            write_report(report, out, "Unguided EMA samples after DDPM training", stem="ddpm_report",
                         device=device, amp=tc["amp"])
            print(f"[ddpm] unguided samples: {report['in_band'] * 100:.1f}% of thickness in the unseen band "
                  f"({report['band_low']:.2f}, {report['band_high']:.2f}) px", flush=True)


def train_classifier(config, out, args, device, name, data, dist=(0, 1)):
    """The noisy guidance classifier on x_t of the DDPM's chain; <name>.pt, <name>.json, a heatmap for circles."""
    images, labels = data
    _, diffusion = ckpt_io.build_ddpm(config)
    ctrain = config["classifier_train"]
    torch.manual_seed(ctrain["seed"])
    model = ckpt_io.build_classifier(config).to(device)
    sn = " with spectral norm (lipschitz %g)" % config["classifier"]["lipschitz"] if config["classifier"]["spectral_norm"] else ""
    intensity = ctrain.get("intensity", 1.0)           # absent from configs of older runs
    print(f"[{name}] classifier {count_parameters(model) / 1e6:.2f}M parameters{sn}, "
          f"{ctrain['steps']} steps, augment {ctrain['augment']}, crop {ctrain.get('crop_scale') or 'off'}"
          + (f", intensity U({intensity:g}, 1)" if intensity < 1 else ""), flush=True)
    augment = ctrain["augment"]
    batches = Batches(images, labels, ctrain["batch_size"], flip=None if augment == "none" else
                      "swap" if augment == "mirror" else LABEL_UNDER_FLIP[config["data"]["name"]],
                      seed=ctrain["seed"], intensity=intensity, crop_scale=ctrain.get("crop_scale"))
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
        model.eval()
        heat, coords = classifier_heatmap(model, config["data"]["image_size"], config["data"]["radius"], device=device)
        plot_heatmaps({f"{name}: p(right | circle at x, y), t=0": heat}, coords, out / f"{name}_heatmap.png",
                      config["data"]["image_size"])


# ---------------------------------------------------------------------------------------------------
# CPU: the classifier trains in a second process during the DDPM's first steps
# ---------------------------------------------------------------------------------------------------

# Measured on the 2-core CPU (RESULTS.md, Speed): side by side on one thread each, the cpu preset's DDPM (batch 32)
# makes 0.85 steps per classifier step (batch 64), so the classifier's 800 steps end near DDPM step 680.
OVERLAP_RATIO = 0.85


class ClassifierBeside:
    """The guidance classifier trained in a second process on half the threads during the DDPM's first `until`
    steps (on 2 cores, two one-thread jobs do 1.2-1.3x the work of one two-thread job: RESULTS.md, Speed). Called
    by fit before every DDPM step. The DDPM takes its threads back at step `until` exactly, waiting if need be:
    the thread count changes float rounding, so a timing-dependent switch would make runs differ."""

    def __init__(self, config, out, args, name, until, threads):
        self.job, self.until, self.threads = (config, out, args, name, max(1, threads // 2)), until, threads
        self.proc, self.done = None, False

    def __call__(self, step):
        if step >= self.until:
            self.finish()
        elif self.proc is None and not self.done:
            self.proc = multiprocessing.get_context("spawn").Process(target=classifier_process, args=self.job)
            self.proc.start()
            torch.set_num_threads(max(1, self.threads - self.threads // 2))

    def finish(self):
        if self.proc is not None:
            self.proc.join()
            code, self.proc, self.done = self.proc.exitcode, None, self.proc.exitcode == 0
            torch.set_num_threads(self.threads)
            if not self.done:   # its error is printed above
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
    with one_line_errors("train.py"):
        train_classifier(config, out, args, torch.device("cpu"), name, training_sets(config["data"])[1])


def overlap_steps(args, config, device, world, what):
    """DDPM steps during which the classifier trains beside it (0 = one after the other)."""
    on = args.overlap
    if on is None:
        on = device.type == "cpu" and world == 1 and torch.get_num_threads() >= 2
    if not on or what != ("ddpm", "classifier"):
        return 0
    return max(1, round(OVERLAP_RATIO * config["classifier_train"]["steps"]))


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------

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


def main(argv=None, check_only=False):
    """train.py's entry point; check_only: return the run config after every check, before any work (scripts/repeat.py
    checks its classifiers' flags so before sampling anything)."""
    args = run_config.parse_args(argv)
    made = {}   # the outermost run folder this call creates (rank 0), removed again if the run fails early
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)   # also when started with SIGINT ignored (a `cmd &` in a script)
    out = Path(args.out or f"runs/{args.data}")
    with one_line_errors("train.py", cleanup=lambda: discard_unfinished(made.get("root"), out)):
        rank, world, device = setup_distributed(resolve_device(args.device))
        if args.amp is None:
            args.amp = amp_default(device)
        name = args.classifier_name or ("classifier_sn" if args.spectral_norm else "classifier")
        what = ("ddpm", "classifier") if args.what == "all" else (args.what,)
        saved = None
        if "ddpm" not in what and (out / "config.json").exists():
            saved = ckpt_io.read_config(out / "config.json")
            args.image_size = args.image_size or saved["data"]["image_size"]    # another: check_saved_run refuses
        config = run_config.build_config(args)
        if saved is not None:  # a classifier added to a run shares the DDPM's data and chain
            run_config.check_saved_run(args, config, saved, out)
            config.update(data=saved["data"], diffusion=saved["diffusion"])
        run_config.check_run(args, config, device, world, what, out, name)
        if check_only:
            return config
        preset = run_config.preset_of(args)
        if args.what in ("evaluator", "filter"):
            made["root"] = new_folder_root(out)
            out.mkdir(parents=True, exist_ok=True)
            steps, width = args.eval_steps or preset["eval_steps"], args.eval_width or preset["eval_width"]
            if args.what == "evaluator":
                (train_digit_evaluator if config["data"]["name"] == "mnist" else train_evaluator_run)(
                    config["data"], out, steps, width, args.seed, device)
            else:
                targets = filter_targets(args.train_size, args.top_k, len(config["data"]["attrs"]))
                filter_run(config["data"], out, targets, args.tau1, args.tau2, args.members, steps, width, args.seed,
                           device, stage1=args.stage1)
            print(f"done: {out}", flush=True)
            return
        data, clf_data = training_sets(config["data"])  # fail on bad data before any work
        if "classifier" in what or args.cfg_dropout > 0:     # both learn to tell the classes apart
            check_classes(clf_data[1], "the guidance classifier" if "classifier" in what else "--cfg-dropout's DDPM")
        config["classifier"]["num_classes"] = max(2, int(clf_data[1].max()) + 1)
        if args.cfg_dropout > 0:   # K classes + the null label K
            ckpt_io.backbone_config(config)["num_classes"] = config["classifier"]["num_classes"] + 1
        if rank == 0:
            made["root"] = new_folder_root(out)
            out.mkdir(parents=True, exist_ok=True)
        beside = None
        if "ddpm" in what:
            config["dc_prior"] = channel_mean_stats(data[0])   # saved with the DDPM; read by cpu_preset.dc_prior
            config["train"]["overlap_steps"] = overlap_steps(args, config, device, world, what)
            if config["train"]["overlap_steps"]:
                beside = ClassifierBeside(config, out, args, name, config["train"]["overlap_steps"],
                                          torch.get_num_threads())
            if rank == 0:
                ckpt_io.write_json(config, out / "config.json")
            train_ddpm(config, out, args, device, data, (rank, world), beside)
        if "classifier" in what and not (beside is not None and beside.done):
            train_classifier(config, out, args, device, name, clf_data, (rank, world))
        digits = config["data"]["name"] == "mnist" and not (out / DIGIT_EVALUATOR).exists()
        if args.what == "all" and digits and rank == 0:
            train_digit_evaluator(config["data"], out, args.eval_steps or preset["eval_steps"],
                                  args.eval_width or preset["eval_width"], args.seed, device)   # judges the samples
        if world > 1:   # rank 0 may still be plotting: a rank that tears gloo down alone can abort (SIGABRT)
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    print(f"done: {out}", flush=True)


if __name__ == "__main__":
    main()
