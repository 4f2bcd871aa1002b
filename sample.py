"""Sample a trained run, unguided or with (multi-)classifier guidance, and evaluate the samples.

  python sample.py --lambdas 30,30                  # multi-guidance [ZSI eq. 2] with runs/circles/classifier.pt
  python sample.py --lambdas 0,30                   # regular classifier guidance towards class 1
  python sample.py                                  # unguided
  python sample.py --classifier classifier --lambdas 30,30 --classifier classifier_sn --lambdas 10,10

Everything is rebuilt from the run folder (config and checkpoints). Writes a new folder
<run>/samples/<tag>/ (never overwriting one, unless --overwrite) with samples.npz (key `images`: uint8
N×H×W×3, plus `lambdas`, `seed`, `classifiers`), grid.png, and for circles report.json/report.md, the
histogram of circle centres (training data vs unguided vs guided) and the classifier heatmaps (Fig. 7b).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint as ckpt_io
from data import DataError, circles_dataset, save_grid, to_uint8
from evaluate import (circle_metrics, classifier_heatmap, plot_heatmaps, plot_histograms, plot_overview,
                      write_report)
from guidance import multi_guidance, parse_lambdas
from unet import amp_default, autocast


def amp_model(model, device, amp):
    """The U-Net under the one autocast context, returning float32."""
    def net(x, t, **kwargs):
        with autocast(device, amp):
            return model(x, t, **kwargs).float()
    return net


def generate(model, diffusion, num_samples, batch_size=256, amp=True, device="cpu", seed=0, cond_fn=None,
             ddim=False, eta=0.0, verbose=False, model_kwargs=None):
    """uint8 [N, H, W, C] samples; noise from a CPU generator seeded with `seed` (reproducible)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    net = amp_model(model, device, amp)
    out, t0 = [], time.time()
    for i in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - i)
        shape = (b, model.in_channels, model.image_size, model.image_size)
        loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
        kwargs = dict(eta=eta) if ddim else {}
        x = loop(net, shape, cond_fn=cond_fn, generator=gen, device=device, model_kwargs=model_kwargs,
                 progress=verbose and sys.stderr.isatty(), **kwargs)
        out.append(to_uint8(x))
        done = i + b
        if verbose:
            rate = done / (time.time() - t0)
            print(f"[sample] {done}/{num_samples} images | {rate:.2f} img/s | "
                  f"ETA {(num_samples - done) / rate:.0f}s", flush=True)
    return np.concatenate(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to sample")
    g.add_argument("--run", default="runs/circles", help="run folder written by train.py")
    g.add_argument("--lambdas", action="append", default=None,
                   help="guidance weights λ_m, one per class of the matching --classifier, e.g. 30,30 "
                        "(repeat with --classifier for several classifiers; 0,0 or absent = unguided)")
    g.add_argument("--classifier", action="append", default=None,
                   help="classifier name in the run (e.g. classifier_sn) or a .pt path; default: classifier")
    g.add_argument("--num-samples", type=int, default=None, help="number of samples (default 1000 circles, 10000 else)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=int, default=None, help="respaced steps (default: the run's, 64 circles / 250 paper)")
    g.add_argument("--ddim", action="store_true", help="DDIM instead of ancestral sampling")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 = deterministic)")
    g.add_argument("--batch-size", type=int, default=256, help="samples per batch")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast the U-Net: fp16 on CUDA, bf16 on CPU (default: on for CUDA and CPUs with native bf16)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g = p.add_argument_group("output")
    g.add_argument("--name", default=None, help="folder name under <run>/samples (default: from λ, steps, seed)")
    g.add_argument("--overwrite", action="store_true", help="reuse an existing folder of the same name")
    return p.parse_args(argv)


def resolve_classifiers(args, run):
    """[(name, path)] and [λ vectors as strings], checked for count."""
    lambdas = args.lambdas or []
    names = args.classifier or (["classifier"] if lambdas else [])
    if len(lambdas) != len(names):
        raise ValueError(f"got {len(names)} --classifier and {len(lambdas)} --lambdas; give one --lambdas per "
                         f"--classifier, in the same order")
    out = []
    for n in names:
        path = Path(n) if n.endswith(".pt") else run / f"{n}.pt"
        out.append((Path(n).stem, path))
    return out, lambdas


def output_dir(run, name, overwrite):
    base = run / "samples" / name
    if overwrite or not base.exists():
        return base
    k = 2
    while (run / "samples" / f"{name}-{k}").exists():
        k += 1
    return run / "samples" / f"{name}-{k}"


def circles_pictures(samples, x, label, config, run, out, classifiers, device):
    """Histogram of centres (train / unguided / these samples), overview figure, heatmaps of the classifiers."""
    d = config["data"]
    _, _, pos = circles_dataset(d["image_size"], d["radius"], d["delta"], seed=d["seed"])
    hists = {"training data": pos[:, 0] / d["image_size"]}
    unguided = run / "ddpm_samples.npz"
    if unguided.exists():
        unguided = np.load(unguided)["images"]
        hists["unguided"] = circle_metrics(unguided)["x"]
    hists[label] = x
    plot_histograms(hists, out / "histogram_x.png", "circle centre x / W (single-circle samples)")
    if isinstance(unguided, np.ndarray):
        plot_overview(unguided, samples, hists, out / "overview.png", title=label)
    maps, paths = {}, {p.stem: p for p in sorted(run.glob("*.pt")) if p.stem != "ddpm"}
    paths.update({n: p for n, p in classifiers})
    for n, p in paths.items():
        try:
            clf, _ = ckpt_io.load_classifier(p, device)
        except ckpt_io.CheckpointError:
            continue
        maps[n], coords = classifier_heatmap(clf, d["image_size"], d["radius"], device=device)
    if maps:
        plot_heatmaps(maps, coords, out / "heatmaps.png", d["image_size"])


def main(argv=None):
    args = parse_args(argv)
    try:
        from train import resolve_device
        run = Path(args.run)
        if not run.is_dir():
            raise ckpt_io.CheckpointError(f"run folder {run} does not exist; train first with "
                                          f"`python train.py --data circles` or pass --run DIR")
        device = resolve_device(args.device)
        if args.amp is None:
            args.amp = amp_default(device)
        if args.num_samples is not None and args.num_samples < 1:
            raise ValueError(f"--num-samples must be a positive integer, got {args.num_samples}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
        if args.eta < 0 or args.eta != args.eta:
            raise ValueError(f"--eta must be a number >= 0, got {args.eta}")
        model, diffusion, config = ckpt_io.load_ddpm(run / "ddpm.pt", device)
        named_paths, lambda_texts = resolve_classifiers(args, run)
        classifiers, lambdas = [], []
        for (name, path), text in zip(named_paths, lambda_texts):
            clf, ccfg = ckpt_io.load_classifier(path, device)
            if ccfg["diffusion"] != config["diffusion"]:
                raise ValueError(f"classifier {path} was trained on another diffusion chain than {run}/ddpm.pt")
            classifiers.append(clf)
            lambdas.append(parse_lambdas(text, ccfg["classifier"]["num_classes"]))
        steps = config["sample_steps"] if args.steps is None else args.steps
        if not 1 <= steps <= diffusion.num_steps:
            raise ValueError(f"--steps must be in 1..{diffusion.num_steps}, got {steps}")
        circles = config["data"]["name"] == "circles"
        n = args.num_samples or (1000 if circles else 10000)
        tag = "_".join(f"{nm}{'-'.join(f'{v:g}' for v in l)}" for (nm, _), l in zip(named_paths, lambdas)) or "unguided"
        name = args.name or f"{tag}_steps{steps}{'_ddim' if args.ddim else ''}_n{n}_seed{args.seed}"
        out = output_dir(run, name, args.overwrite)
    except (ckpt_io.CheckpointError, DataError, ValueError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)

    cond_fn = multi_guidance(classifiers, lambdas) if classifiers else None
    print(f"[sample] {n} samples, {steps} {'DDIM' if args.ddim else 'ancestral'} steps, "
          f"guidance {tag}, device {device} -> {out}", flush=True)
    t0 = time.time()
    samples = generate(model, diffusion.respace(steps), n, args.batch_size, args.amp, device, args.seed,
                       cond_fn=cond_fn, ddim=args.ddim, eta=args.eta, verbose=True)
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "samples.npz", images=samples, lambdas=json.dumps(lambdas), seed=args.seed,
                        classifiers=json.dumps([str(p) for _, p in named_paths]))
    save_grid(samples[:100], out / "grid.png", nrow=10, scale=max(1, 128 // samples.shape[1]))
    report = dict(run=str(run), guidance=tag, lambdas=json.dumps(lambdas), steps=steps, sampler="ddim" if args.ddim else "ancestral",
                  num_samples=n, seed=args.seed, seconds=round(seconds, 1))
    if circles:
        m = circle_metrics(samples)
        report.update(accuracy_middle=m["accuracy"], zero_or_multi=m["invalid"], zero_circles=m["zero_circles"],
                      multi_circles=m["multi_circles"])
        label = "unguided" if not classifiers else f"λ = {'; '.join(','.join(f'{v:g}' for v in l) for l in lambdas)}"
        circles_pictures(samples, m["x"], label, config, run, out, named_paths, device)
        write_report(report, out, f"Samples of {run}: {tag}")
        print(f"[sample] accuracy (one circle, centre x/W in [0.2, 0.8]) {m['accuracy'] * 100:.1f}% | "
              f"0 or 2+ circles {m['invalid'] * 100:.1f}% | {seconds:.0f}s", flush=True)
    else:
        write_report(report, out, f"Samples of {run}: {tag}")
    print(f"done: {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
