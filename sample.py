"""Sample a trained run, unguided or with (multi-)classifier guidance, and evaluate the samples.

  python sample.py --lambdas 30,30                  # multi-guidance [ZSI eq. 2] with runs/circles/classifier.pt
  python sample.py --lambdas 0,30                   # regular classifier guidance towards class 1
  python sample.py                                  # unguided
  python sample.py --classifier classifier --lambdas 30,30 --classifier classifier_sn --lambdas 10,10

Everything is rebuilt from the run folder (config and checkpoints). Writes a new folder
<run>/samples/<tag>/ (never overwriting one, unless --overwrite; filled under a temporary name and renamed when
complete, so a failed run leaves nothing behind) with samples.npz (key `images`: uint8
N×H×W×3, plus `lambdas`, `seed`, `classifiers`), grid.png, and for circles report.json/report.md, the
histogram of circle centres (training data vs unguided vs guided) and the classifier heatmaps (Fig. 7b).

  torchrun --nproc_per_node 4 sample.py --run-dir runs/circles --lambdas 30,30   # 4 processes/GPUs, same samples
"""
import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import checkpoint as ckpt_io
import inversion
from data import DataError, channel_mean_stats, circles_dataset, save_grid, sizes_dataset, to_float, to_uint8
from evaluate import (MIN_AREA, circle_metrics, detect_circles, size_metrics, classifier_heatmap, plot_heatmaps, plot_histograms, plot_overview,
                      write_report)
from guidance import above_timestep, classifier_free, multi_guidance, parse_lambdas
from unet import amp_default, autocast


def amp_model(model, device, amp, channels_last=False):
    """The U-Net under the one autocast context (optionally in channels_last memory format), returning float32."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=fmt)

    def net(x, t, **kwargs):
        with autocast(device, amp):
            return model(x.contiguous(memory_format=fmt), t, **kwargs).float().contiguous()
    return net


def default_batch_size(device):
    """Samples per batch: 64 on CPU, 256 on GPUs. On the 2-core CPU, 64 is 11-17% faster per image than 256 with the
    mirror-equivariant classifier (its batch is 2N) and the same with the paper's head (RESULTS.md, session 6)."""
    return 64 if torch.device(device).type == "cpu" else 256


def generate(model, diffusion, num_samples, batch_size=None, amp=True, device="cpu", seed=0, cond_fn=None,
             ddim=False, eta=0.0, verbose=False, model_kwargs=None, channels_last=False, cfg=None, shard=(0, 1),
             guide_at="x_t"):
    """uint8 [N, H, W, C] samples. Batch b draws its noise from a CPU generator seeded with seed + 1000003·b, so
    the samples depend on (seed, batch size) only, not on how many processes share the work.

    shard = (rank, world): this process samples batches b ≡ rank (mod world) and the result is gathered on every
    rank (torchrun). channels_last runs the U-Net in NHWC memory format (faster on CPU, RESULTS.md), same math up
    to float rounding. cfg = (λ, K): classifier-free multi-guidance over K classes (eq. 12).
    """
    device = torch.device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    rank, world = shard
    net = amp_model(model, device, amp, channels_last)
    if cfg is not None:
        net = classifier_free(net, *cfg)
    starts = list(range(0, num_samples, batch_size))
    mine = starts[rank::world]
    out, t0 = {}, time.time()
    for i in mine:
        b = min(batch_size, num_samples - i)
        gen = torch.Generator().manual_seed(seed + 1_000_003 * (i // batch_size))
        shape = (b, model.in_channels, model.image_size, model.image_size)
        loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
        kwargs = dict(eta=eta) if ddim else dict(guide_at=guide_at)
        x = loop(net, shape, cond_fn=cond_fn, generator=gen, device=device, model_kwargs=model_kwargs,
                 progress=verbose and sys.stderr.isatty(), **kwargs)
        out[i] = to_uint8(x)
        if verbose:
            done = sum(len(v) for v in out.values()) * world
            rate = done / (time.time() - t0)
            print(f"[sample] ~{min(done, num_samples)}/{num_samples} images | {rate:.2f} img/s | "
                  f"ETA {max(0, num_samples - done) / rate:.0f}s", flush=True)
    if world > 1:
        import torch.distributed as tdist
        parts = [None] * world
        tdist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    return np.concatenate([out[i] for i in starts])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to sample")
    g.add_argument("--run", "--run-dir", dest="run", default="runs/circles",
                   help="run folder written by train.py (under torchrun write --run-dir: torchrun reads --run itself)")
    g.add_argument("--lambdas", action="append", default=None,
                   help="guidance weights λ_m, one per class of the matching --classifier, e.g. 30,30 "
                        "(repeat with --classifier for several classifiers; 0,0 or absent = unguided)")
    g.add_argument("--classifier", action="append", default=None,
                   help="classifier name in the run (e.g. classifier_sn) or a .pt path; default: classifier")
    g.add_argument("--num-samples", type=int, default=None, help="number of samples (default 1000 circles, 10000 else)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free multi-guidance weight λ of eq. 12 (needs a run trained with --cfg-dropout)")
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=int, default=None,
                   help="respaced steps in 1..T, 1 = one step from pure noise (default: the run's, 64 circles / "
                        "250 paper)")
    g.add_argument("--ddim", action="store_true", help="DDIM instead of ancestral sampling")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM η (0 = deterministic)")
    g.add_argument("--guide-at", choices=["x_t", "mean"], default="x_t",
                   help="where the classifier gradient is taken: at x_t with t (guided-diffusion, the official code) "
                        "or at the mean μ with the timestep of x_{t-1} (the paper's Sec. 2.2); ancestral only")
    g.add_argument("--guide-t-min", type=int, default=None,
                   help="classifier guidance only at timesteps t >= this, 0 = every step (the paper); default: the "
                        "run's setting, 3T/8 for the cpu preset (fewer faded discs; not in the paper); 0 for --edit")
    g.add_argument("--batch-size", type=int, default=None,
                   help="samples per batch (default: 64 on CPU, 256 on GPU; the samples depend on it)")
    g.add_argument("--dc-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="replace ε̂'s per-image channel means by their closed-form posterior mean (fixes the grey "
                        "backgrounds of small U-Nets; not in the paper; default: the run's setting, on for the cpu preset)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="autocast the U-Net: fp16 on CUDA, bf16 on CPU (default: on for CUDA and CPUs with native bf16)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="run the U-Net in channels_last memory format (faster on CPU and GPU)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--evaluator", action="append", default=None,
                   help="evaluation classifier .pt (celeba; default: the run's evaluator_<attr>.pt); two for the "
                        "two-attribute heatmap (Fig. 9)")
    g.add_argument("--quality", action="store_true",
                   help="also FID / precision / recall (App. I) and nearest training images (App. H) in pixel and "
                        "classifier-feature space")
    g = p.add_argument_group("DDIM inversion (App. M, N)")
    g.add_argument("--interpolate", action="store_true",
                   help="App. M: invert two real images (--images, or a left and a right training circle) to "
                        "--t-fraction of the chain and decode the slerp / lerp path between their latents")
    g.add_argument("--edit", action="store_true",
                   help="App. N: invert real images (--images, or --num-samples border circles) to --t-fraction and "
                        "denoise them with the guidance of --lambdas, DDIM with η_t = t / t_start")
    g.add_argument("--images", default=None, help="comma-separated image files for --interpolate / --edit")
    g.add_argument("--t-fraction", type=float, default=0.5,
                   help="inversion depth as a fraction of the chain, in (0, 1]: respaced index round(f·(steps-1)), "
                        "at least 1; 1 = the last kept timestep T-1")
    g.add_argument("--points", type=int, default=9, help="--interpolate: points on the path")
    g = p.add_argument_group("output")
    g.add_argument("--name", default=None, help="folder name under <run>/samples (default: from λ, steps, seed)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing folder of the same name (once the new one is complete)")
    g.add_argument("--heatmaps", choices=["main", "all"], default="main",
                   help="circles: classifier heatmaps (Fig. 7b) of the guidance classifiers and the run's classifier / "
                        "classifier_sn (main), or of every classifier in the run folder (all: slow after a repeat)")
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


def sample_label(lambdas, cfg):
    """Legend name of a sample set: "unguided", "λ = 30,30" (classifier guidance), "CFG w = 3" or both."""
    parts = [f"λ = {'; '.join(','.join(f'{v:g}' for v in l) for l in lambdas)}"] if lambdas else []
    parts += [f"CFG w = {cfg:g}"] if cfg is not None else []
    return ", ".join(parts) or "unguided"


def sampling_chain(diffusion, config, dc_correction=None):
    """The chain to sample with: `diffusion`, with the DC correction of ε̂ (ddpm.Diffusion.dc_corrected_eps) if
    asked, or by default if the run's config says so (runs trained before it existed: off)."""
    use = config.get("dc_correction", False) if dc_correction is None else dc_correction
    if not use:
        return diffusion
    prior = config.get("dc_prior")
    if prior is None:  # runs from before the statistics were saved: recompute them for synthetic data
        if config["data"]["name"] not in ("circles", "sizes"):
            raise ValueError("--dc-correction needs the data statistics saved by train.py since it exists; "
                             "retrain the run or sample with --no-dc-correction")
        from train import load_data
        prior = channel_mean_stats(load_data(config["data"])[0])
    return diffusion.with_dc_prior(prior["mean"], prior["var"])


def guide_t_min_default(config, edit=False):
    """Guidance at t >= this unless --guide-t-min: the run's setting (runs from before it: every step), but every
    step for --edit, whose guidance window is already set by --t-fraction (App. N)."""
    return 0 if edit else config.get("guide_t_min", 0)


def output_dir(run, name, overwrite):
    base = run / "samples" / name
    if overwrite or not base.exists():
        return base
    k = 2
    while (run / "samples" / f"{name}-{k}").exists():
        k += 1
    return run / "samples" / f"{name}-{k}"


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


def heatmap_classifiers(run, classifiers, which="main"):
    """{name: path} of the classifiers whose heatmaps to draw: the run's classifier and classifier_sn plus the
    guidance classifiers (main), or every .pt in the run folder but the DDPM (all)."""
    stems = None if which == "all" else {"classifier", "classifier_sn"}
    paths = {p.stem: p for p in sorted(run.glob("*.pt")) if p.stem != "ddpm" and (stems is None or p.stem in stems)}
    paths.update({n: p for n, p in classifiers})
    return paths


def circles_pictures(samples, x, label, config, run, out, classifiers, device, which="main"):
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
    maps = {}
    for n, p in heatmap_classifiers(run, classifiers, which).items():
        try:
            clf, _ = ckpt_io.load_classifier(p, device)
        except ckpt_io.CheckpointError:
            continue
        maps[n], coords = classifier_heatmap(clf, d["image_size"], d["radius"], device=device)
    if maps:
        plot_heatmaps(maps, coords, out / "heatmaps.png", d["image_size"])


def evaluator_paths(args, config, run):
    """The evaluation classifiers that score samples: --evaluator, else the run's evaluator_<attr>.pt files."""
    if args.evaluator:
        return [Path(p) for p in args.evaluator]
    if config["data"]["name"] != "celeba":
        return []
    attrs = [a.replace("/", "_") for a in config["data"]["attrs"]]
    joined = run / f"evaluator_{'-'.join(attrs)}.pt"
    paths = [joined] if len(attrs) == 1 else [run / f"evaluator_{a}.pt" for a in attrs]
    return [p for p in paths if p.exists()] if len(attrs) == 1 else (paths if all(p.exists() for p in paths) else [])


def attribute_report(samples, evaluators, config, run, out, label, device):
    """Scores of the samples by the evaluation classifier(s): the 100-bin histogram (log y) against the
    training data and unguided samples, KLD / "MSE" to uniform (paper-exact and [0, 1] bins), the samples
    with p in [0.49, 0.51] (Fig. 4, 8); with two evaluators the 20x20 ln-count heatmap (Fig. 9)."""
    from evaluate import log_count_heatmap, plot_log_heatmaps, uniformity_report
    from filtering import predict_probs
    from train import load_data
    models = [ckpt_io.load_evaluator(p, device)[0] for p in evaluators]
    score = lambda imgs: [predict_probs(m, imgs, device=device)[:, 1].numpy() for m in models]
    train_images, _ = load_data(config["data"])
    sets = {"training data": train_images}
    if (run / "ddpm_samples.npz").exists() and label != "unguided":
        sets["unguided"] = np.load(run / "ddpm_samples.npz")["images"]
    sets[label] = samples
    scores = {name: score(imgs) for name, imgs in sets.items()}
    report = {}
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


def feature_extractors(classifier_path, device, batch_size=256):
    """{name: uint8 images -> [N, D]}: raw pixels and the guidance classifier's penultimate features at t = 0
    (CLIP / Inception are not available offline; pass your own extractor to evaluate.quality_report)."""
    from data import to_float
    extractors = {"pixels": lambda imgs: imgs.reshape(len(imgs), -1).astype(np.float32) / 127.5 - 1}
    if classifier_path is not None and Path(classifier_path).exists():
        clf, _ = ckpt_io.load_classifier(classifier_path, device)

        def clf_features(imgs):
            with torch.no_grad():
                return np.concatenate([clf.features(to_float(imgs[i:i + batch_size]).to(device),
                                                    torch.zeros(len(imgs[i:i + batch_size]), dtype=torch.long,
                                                                device=device)).cpu().numpy()
                                       for i in range(0, len(imgs), batch_size)])
        extractors["classifier"] = clf_features
    return extractors


def quality(samples, config, run, classifier_path, out, device):
    from evaluate import quality_report
    from train import load_data
    train_images, _ = load_data(config["data"])
    d = config["data"]
    reference = circles_dataset(d["image_size"], d["radius"], d["delta"], full_range=True)[0] \
        if d["name"] == "circles" else train_images     # circles: every position, the interpolation target
    return quality_report(samples, train_images, reference, feature_extractors(classifier_path, device), out)


def inversion_inputs(args, config, n):
    """uint8 real images to invert: --images files, else circles from the training borders."""
    from data import load_images
    if args.images:
        paths = [Path(p) for p in args.images.split(",")]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"--images: {', '.join(missing)} not found")
        if args.interpolate and len(paths) != 2:
            raise ValueError(f"--interpolate takes exactly two --images, got {len(paths)}")
        return load_images(paths, config["data"]["image_size"])
    if config["data"]["name"] != "circles":
        raise ValueError("--interpolate / --edit need --images A.png,B.png for this run's data")
    d = config["data"]
    images, labels, _ = circles_dataset(d["image_size"], d["radius"], d["delta"], seed=d["seed"])
    if args.interpolate:
        return np.stack([images[labels == 0][0], images[labels == 1][0]])   # a left and a right circle
    return images[:min(n, len(images))]


def run_inversion(args, model, diffusion, cond_fn, config, run, out, device):
    """App. M interpolation strip or App. N edits, with circle positions measured when the data is circles."""
    real = inversion_inputs(args, config, args.num_samples or 64)
    net = amp_model(model, device, args.amp, args.channels_last)
    t_stop = inversion.inversion_index(args.t_fraction, diffusion.num_steps)
    x = to_float(real).to(device)
    circles = config["data"]["name"] == "circles"
    report = dict(run=str(run), mode="interpolate" if args.interpolate else "edit", steps=diffusion.num_steps,
                  t_stop=t_stop, t_stop_original=int(diffusion.timestep_map[t_stop]), t_fraction=args.t_fraction)
    scale = max(1, 128 // real.shape[1])
    if args.interpolate:
        paths, alphas = inversion.interpolate(diffusion, net, x[0], x[1], t_stop, args.points)
        rows = {k: to_uint8(v) for k, v in paths.items()}
        save_grid(np.concatenate([rows["slerp"], rows["lerp"]]), out / "interpolation.png", nrow=args.points,
                  scale=scale)
        np.savez_compressed(out / "samples.npz", slerp=rows["slerp"], lerp=rows["lerp"], alphas=alphas)
        report["alphas"] = [round(float(a), 3) for a in alphas]
        if circles:
            for k, imgs in rows.items():
                report[f"{k}_circle_x"] = [round(float(c[0, 0] / imgs.shape[2]), 3) if n == 1 else None
                                           for n, c, _ in detect_circles(imgs)]
                report[f"{k}_in_middle"] = circle_metrics(imgs)["accuracy"]
    else:
        gen = torch.Generator().manual_seed(args.seed)
        edited = to_uint8(inversion.edit(diffusion, net, x, t_stop, cond_fn, generator=gen))
        save_grid(np.concatenate([real[:16], edited[:16]]), out / "edit.png", nrow=min(16, len(real)), scale=scale)
        np.savez_compressed(out / "samples.npz", images=edited, originals=real)
        if circles:
            before, after = detect_circles(real), detect_circles(edited)
            moved = [abs(a[1][0, 0] - b[1][0, 0]) >= 2 for b, a in zip(before, after) if a[0] == 1 and b[0] == 1]
            m = circle_metrics(edited)
            report.update(images=len(real), moved_2px_or_more=float(np.sum(moved) / len(real)),
                          edited_in_middle=m["accuracy"], originals_in_middle=circle_metrics(real)["accuracy"],
                          edited_zero_or_multi=m["invalid"])
            plot_histograms({"originals": circle_metrics(real)["x"], "edited": m["x"]}, out / "histogram_x.png",
                            "circle centre x / W (single-circle images)")
    write_report(report, out, f"DDIM {report['mode']} on {run}")
    print(f"[sample] {report['mode']}: " + ", ".join(f"{k} {v}" for k, v in report.items()
                                                   if k.endswith(("middle", "2px_or_more", "_x"))), flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        from train import resolve_device, setup_distributed
        run = Path(args.run)
        if not run.is_dir():
            raise ckpt_io.CheckpointError(f"run folder {run} does not exist; train first with "
                                          f"`python train.py --data circles` or pass --run DIR")
        rank, world, device = setup_distributed(resolve_device(args.device))
        if world > 1 and (args.interpolate or args.edit):
            raise ValueError("--interpolate / --edit run in one process; start them without torchrun")
        if args.amp is None:
            args.amp = amp_default(device)
        if args.num_samples is not None and args.num_samples < 1:
            raise ValueError(f"--num-samples must be a positive integer, got {args.num_samples}")
        if args.batch_size is None:
            args.batch_size = default_batch_size(device)
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
        dc_default = config.get("dc_correction", False)    # the run's choice; runs from before it: off
        dc = dc_default if args.dc_correction is None else args.dc_correction
        diffusion = sampling_chain(diffusion, config, dc)
        cfg_classes = ckpt_io.backbone_config(config).get("num_classes", 0) - 1
        if args.cfg is not None and (cfg_classes < 1 or args.cfg != args.cfg):
            raise ValueError(f"--cfg {args.cfg}: needs a finite weight and a run trained with --cfg-dropout"
                             if cfg_classes >= 1 else f"--cfg: {run}/ddpm.pt is unconditional; train with "
                             f"`train.py --cfg-dropout 0.1` for classifier-free guidance")
        missing = [p for p in (args.evaluator or []) if not Path(p).exists()]
        if missing:
            raise ValueError(f"--evaluator {missing[0]} not found; train one with `train.py --data celeba "
                             f"--what evaluator`")
        if args.interpolate and args.edit:
            raise ValueError("--interpolate and --edit are separate runs; pass one of them")
        if not 0 < args.t_fraction <= 1:
            raise ValueError(f"--t-fraction must be in (0, 1], got {args.t_fraction}")
        if args.points < 2:
            raise ValueError(f"--points must be at least 2, got {args.points}")
        if args.edit and not classifiers:
            raise ValueError("--edit needs guidance: pass --lambdas (e.g. 30,30) for the run's classifier")
        if args.guide_at == "mean" and (args.ddim or args.interpolate or args.edit or not classifiers):
            raise ValueError("--guide-at mean moves the classifier gradient of ancestral sampling: it needs --lambdas "
                             "and no --ddim, --interpolate or --edit (or drop --guide-at)")
        t_min_default = guide_t_min_default(config, args.edit)
        t_min = t_min_default if args.guide_t_min is None else args.guide_t_min
        if not 0 <= t_min <= diffusion.num_steps:
            raise ValueError(f"--guide-t-min must be a timestep in 0..{diffusion.num_steps} (0 = guide every step), "
                             f"got {t_min}")
        if args.guide_t_min is not None and not classifiers:
            raise ValueError("--guide-t-min limits classifier guidance: it needs --lambdas (or drop --guide-t-min)")
        if not 1 <= steps <= diffusion.num_steps:
            raise ValueError(f"--steps must be in 1..{diffusion.num_steps}, got {steps}")
        if args.interpolate or args.edit:
            inversion.inversion_index(args.t_fraction, steps)     # a latent index in 1..steps-1 exists
        circles = config["data"]["name"] == "circles"
        n = args.num_samples or (1000 if circles else 10000)
        tag = "_".join(f"{nm}{'-'.join(f'{v:g}' for v in l)}" for (nm, _), l in zip(named_paths, lambdas))
        tag = "_".join(filter(None, [tag, f"cfg{args.cfg:g}" if args.cfg is not None else ""])) or "unguided"
        mode = "interpolate_" if args.interpolate else "edit_" if args.edit else ""
        dc_tag = "" if dc == dc_default else "_dc" if dc else "_nodc"
        guide_tag = ("_atmean" if args.guide_at == "mean" else "") + ("" if t_min == t_min_default else f"_from{t_min}")
        name = args.name or (f"{mode}{tag}_steps{steps}{'_ddim' if args.ddim else ''}{dc_tag}{guide_tag}_n{n}"
                             f"_seed{args.seed}")
        if args.interpolate or args.edit:
            inversion_inputs(args, config, n)       # fail on bad --images before any work
        out = output_dir(run, name, args.overwrite)
    except (ckpt_io.CheckpointError, DataError, ValueError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)

    cond_fn = above_timestep(multi_guidance(classifiers, lambdas), t_min) if classifiers else None
    if args.interpolate or args.edit:
        with staged_output(out) as tmp:
            run_inversion(args, model, diffusion.respace(steps), cond_fn, config, run, tmp, device)
        print(f"done: {out}", flush=True)
        return out
    print(f"[sample] {n} samples, {steps} {'DDIM' if args.ddim else 'ancestral'} steps"
          f"{', DC correction' if dc else ''}, guidance {tag}{f' at t >= {t_min}' if classifiers and t_min else ''}, "
          f"device {device} -> {out}", flush=True)
    t0 = time.time()
    samples = generate(model, diffusion.respace(steps), n, args.batch_size, args.amp, device, args.seed,
                       cond_fn=cond_fn, ddim=args.ddim, eta=args.eta, verbose=True, channels_last=args.channels_last,
                       cfg=(args.cfg, cfg_classes) if args.cfg is not None else None, shard=(rank, world),
                       guide_at=args.guide_at)
    seconds = time.time() - t0
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return out
    final = out
    with staged_output(final) as out:     # the block writes into a temporary folder
        np.savez_compressed(out / "samples.npz", images=samples, lambdas=json.dumps(lambdas), seed=args.seed,
                            batch_size=args.batch_size, classifiers=json.dumps([str(p) for _, p in named_paths]))
        save_grid(samples[:100], out / "grid.png", nrow=10, scale=max(1, 128 // samples.shape[1]))
        report = dict(run=str(run), guidance=tag, lambdas=json.dumps(lambdas), steps=steps,
                      sampler="ddim" if args.ddim else "ancestral", dc_correction=dc, guide_at=args.guide_at,
                      guide_t_min=t_min if classifiers else None,
                      num_samples=n, seed=args.seed,
                      batch_size=args.batch_size, seconds=round(seconds, 1))
        if circles:
            m = circle_metrics(samples)
            report.update(accuracy_middle=m["accuracy"], zero_or_multi=m["invalid"], zero_circles=m["zero_circles"],
                          multi_circles=m["multi_circles"], min_area=MIN_AREA,
                          accuracy_any_size=m["accuracy_any_size"], zero_or_multi_any_size=m["invalid_any_size"])
            label = sample_label(lambdas, args.cfg)
            circles_pictures(samples, m["x"], label, config, run, out, named_paths, device, args.heatmaps)
            print(f"[sample] accuracy (one circle, centre x/W in [0.2, 0.8]) {m['accuracy'] * 100:.1f}% | "
                  f"0 or 2+ circles {m['invalid'] * 100:.1f}% (blobs of any size: "
                  f"{m['accuracy_any_size'] * 100:.1f}% | {m['invalid_any_size'] * 100:.1f}%) | {seconds:.0f}s",
                  flush=True)
        if config["data"]["name"] == "sizes":
            d = config["data"]
            m = size_metrics(samples, d["r_min"], d["r_max"])
            _, _, train_r = sizes_dataset(d["image_size"], d["r_min"], d["r_max"], d["delta"], seed=d["seed"])
            report.update(accuracy_middle=m["accuracy"], zero_or_multi=m["invalid"],
                          larger_than_training=float((m["z"] > 1).sum() / n),
                          median_radius=float(np.median(m["radius"])) if len(m["radius"]) else None)
            plot_histograms({"training data": (train_r - d["r_min"]) / (d["r_max"] - d["r_min"]), tag: m["z"]},
                            out / "histogram_size.png", "normalised radius (r - r_min) / (r_max - r_min)", bins=60,
                            span=None)
            print(f"[sample] sizes: {m['accuracy'] * 100:.1f}% of samples have a radius in the unseen middle | "
                  f"{report['larger_than_training'] * 100:.1f}% larger than any training object | "
                  f"0 or 2+ objects {m['invalid'] * 100:.1f}%", flush=True)
        evaluators = evaluator_paths(args, config, run)
        if evaluators:
            label = "unguided" if not classifiers and args.cfg is None else tag
            report.update(attribute_report(samples, evaluators, config, run, out, label, device))
        if args.quality:
            report.update(quality(samples, config, run, named_paths[0][1] if named_paths else run / "classifier.pt",
                                  out, device))
        write_report(report, out, f"Samples of {run}: {tag}")
    out = final
    print(f"done: {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
