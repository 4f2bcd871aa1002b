"""sample.py's flags: every one of them and every constraint between them and the run, checked before any work.

`parse_args` defines the flags; `check` resolves their run-dependent defaults (sampling steps, guidance window),
refuses what cannot work (one InputError line each) and names the output folder <run>/samples/<tag>/. The flags of
the beyond-the-paper samplers are beyond/target.py's, those of DDIM inversion appendix/inversion.py's.
"""
import argparse
from pathlib import Path
from types import SimpleNamespace

from cli import (SEED_MAX, ArgumentParser, InputError, check_ranges, check_unused, finite_float, parse_given,
                 parse_lambdas)
from data import check_data_paths
from ddpm import space_timesteps
from appendix import inversion
from appendix.evaluator import evaluator_paths
from appendix.quality import quality_inputs
from beyond import target as target_io
from beyond.mnist_eval import digit_evaluator_path
from infra import checkpoint as ckpt_io
from infra.generate import default_batch_size


DESCRIPTION = "Sample a trained run, unguided or with (multi-)classifier guidance, and evaluate the samples."


def parse_args(argv=None):
    p = ArgumentParser(prog="sample.py", description=DESCRIPTION,
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
    g.add_argument("--cfg-scale", type=finite_float, default=None,
                   help="classifier-free multi-guidance weight λ of eq. 12 (needs a run trained with --cfg-dropout)")
    g = p.add_argument_group("sampler")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="respaced steps in 1..T, 1 = one step from pure noise (default: the run's, 64 circles / "
                        "250 paper)")
    g.add_argument("--ddim", action="store_true", help="DDIM instead of ancestral sampling")
    g.add_argument("--eta", type=finite_float, default=0.0, help="DDIM η in [0, 1] (0 = deterministic)")
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
                   help="evaluation classifier .pt (celeba; default: evaluator_<attr>.pt in the run or in its subset "
                        "file's folder, else an error); two for the two-attribute heatmap (Fig. 9)")
    g.add_argument("--quality", action="store_true",
                   help="also FID / precision / recall (App. I) and nearest training images (App. H) in pixel, "
                        "classifier-feature and (with --inception-weights) FID Inception space")
    g.add_argument("--reference", action="append", default=None, metavar="[NAME=]FILE",
                   help="--quality against the train images of a CelebA index file; repeatable (App. I: full=, mild=)")
    g.add_argument("--inception-weights", metavar="PTH", help="--quality: the standard FID, pytorch-fid's weight file")
    g = p.add_argument_group("DDIM inversion (App. M, N)")
    g.add_argument("--interpolate", action="store_true",
                   help="App. M: invert two real images (--images, or a left and a right training circle) to "
                        "--t-fraction of the chain and decode the slerp / lerp path between their latents")
    g.add_argument("--edit", action="store_true",
                   help="App. N: invert real images (--images, or --num-samples border circles of the classes "
                        "whose λ is 0) to --t-fraction and denoise them with the guidance of --lambdas, DDIM with "
                        "η_t = t / t_start; the paper guides towards one class (e.g. --lambdas 0,30)")
    g.add_argument("--images", default=None, help="comma-separated image files for --interpolate / --edit")
    g.add_argument("--t-fraction", type=finite_float, default=0.5,
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
    target_io.add_arguments(p)
    return parse_given(p, argv)         # args.given: the flags on the command line (cli.check_unused)


def resolve_classifiers(args, run):
    """[(name, path)] and [λ vectors as strings], checked for count."""
    lambdas = args.lambdas or []
    names = args.classifier or (["classifier"] if lambdas or args.target is not None else [])
    lambdas = [None] * len(names) if args.target is not None and not lambdas else lambdas  # --target: its own weights
    if len(lambdas) != len(names):
        raise InputError(f"got {len(names)} --classifier and {len(lambdas)} --lambdas; give one --lambdas per "
                         f"--classifier, in the same order")
    return [(Path(n).stem, Path(n) if n.endswith(".pt") else run / f"{n}.pt") for n in names], lambdas


def sample_label(lambdas, cfg_scale):
    """Legend name of a sample set: "unguided", "λ = 30,30" (classifier guidance), "CFG w = 3" or both."""
    parts = [f"λ = {'; '.join(','.join(f'{v:g}' for v in l) for l in lambdas)}"] if lambdas else []
    parts += [f"CFG w = {cfg_scale:g}"] if cfg_scale is not None else []
    return ", ".join(parts) or "unguided"


def guide_t_min_default(config, edit=False):
    """Guidance at t >= this unless --guide-t-min: the run's setting (runs from before it: every step), but every
    step for --edit, whose guidance window is already set by --t-fraction (App. N)."""
    return 0 if edit else config.get("guide_t_min", 0)


def output_dir(run, name, overwrite):
    """<run>/samples/<name>, or <name>-2, -3, ... when it exists (unless overwrite)."""
    base = run / "samples" / name
    if overwrite or not base.exists():
        return base
    k = 2
    while (run / "samples" / f"{name}-{k}").exists():
        k += 1
    return run / "samples" / f"{name}-{k}"


def check_flags(args, config, T, classifiers, cfg_classes, world):
    """Every constraint between sample.py's flags and the run, before any work; raises InputError. Returns the real
    images to invert for --interpolate / --edit (read here, so that bad --images fail first), else None."""
    for flag, value in (("--num-samples", args.num_samples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    check_ranges(args, [("--eta", "[0, 1]", " (1: the ancestral variance; above it σ_t² > 1 − ᾱ_{t−1})"),
                        ("--cfg-scale", "[-1e6, 1e6]", ", where samples stay finite"),
                        ("--seed", f"[0, {SEED_MAX}]", "")])
    if args.cfg_scale is not None and (cfg_classes < 1 or args.cfg_scale != args.cfg_scale):
        raise InputError(f"--cfg-scale {args.cfg_scale}: needs a finite weight and a run trained with --cfg-dropout"
                         if cfg_classes >= 1 else f"--cfg-scale: {args.run}/ddpm.pt is unconditional; train with "
                         f"`train.py --cfg-dropout 0.1` for classifier-free guidance")
    missing = [p for p in (args.evaluator or []) if not Path(p).exists()]
    if missing:
        raise InputError(f"--evaluator {missing[0]} not found; train one with `train.py --data celeba --what evaluator`")
    if (args.reference or args.inception_weights) and not args.quality:
        raise InputError("--reference / --inception-weights choose what --quality measures: add --quality")
    if args.quality and (args.num_samples or 4) < 4:
        raise InputError(f"--quality compares each sample with its 3 nearest neighbours: it needs --num-samples 4 "
                         f"or more, got {args.num_samples}")
    if args.name is not None and (not args.name or Path(args.name).name != args.name or args.name in (".", "..")):
        raise InputError(f"--name {args.name!r} must be a folder name inside <run>/samples, without '/'")
    if args.guide_at == "mean" and (args.ddim or args.interpolate or args.edit or not classifiers):
        raise InputError("--guide-at mean moves the classifier gradient of ancestral sampling: it needs --lambdas "
                         "and no --ddim, --interpolate or --edit (or drop --guide-at)")
    if not 0 <= args.guide_t_min <= T:
        raise InputError(f"--guide-t-min must be a timestep in 0..{T} (0 = guide every step), got {args.guide_t_min}")
    if not 1 <= args.sample_steps <= T:
        raise InputError(f"--sample-steps must be in 1..{T}, got {args.sample_steps}")
    real = inversion.check_flags(args, config["data"], classifiers, world)     # and reads --images: bad ones fail now
    check_unused(args, [("eta", args.ddim, "it is DDIM's η; add --ddim (ancestral sampling has none)"),
                        ("heatmaps", config["data"]["name"] == "circles" and real is None, "circles samples only")])
    guided = space_timesteps(T, args.sample_steps)[:inversion.inversion_index(args.t_fraction, args.sample_steps) + 1
                                                   if args.edit else None]     # --edit decodes from t_stop down
    top = (guided[:-1] or guided)[-1] if args.guide_at == "mean" else guided[-1]   # mean: x_{t-1}'s timestep
    if classifiers and args.guide_t_min > top:
        given = "" if "guide_t_min" in getattr(args, "given", ()) else " (the run's default)"
        raise InputError(f"--guide-t-min {args.guide_t_min}{given} is above every guided timestep of this chain "
                         f"({top}): no step would be guided; pass --guide-t-min {top} or lower (0: every step)")
    return real


def load_run(args, device):
    """(run folder, DDPM network with its EMA weights, GaussianDiffusion of T steps, config) of --run; InputError
    when there is no run folder or its data set (which the reports read after sampling) is gone."""
    run = Path(args.run)
    if not run.is_dir():
        raise InputError(f"run folder {run} does not exist; train first with `python train.py --data circles` "
                         f"or pass --run DIR")
    model, diffusion, config = ckpt_io.load_ddpm(run / "ddpm.pt", device)
    check_data_paths(config["data"])
    return run, model, diffusion, config


def load_classifiers(args, run, config, device):
    """The --classifier networks as trained but without the CPU preset's mirror head (sample.py adds the preset's
    additions in one place), each checked against the run: (named_paths [(name, path)], classifiers, their configs,
    λ vectors (None for --target)). InputError on a missing file, a misfit or a wrong λ count."""
    named_paths, lambda_texts = resolve_classifiers(args, run)
    classifiers, configs, lambdas = [], [], []
    for (name, path), text in zip(named_paths, lambda_texts):
        clf, clf_config = ckpt_io.load_classifier(path, device, mirror_head=False)
        ckpt_io.check_classifier_fits(clf_config, config, path, run)
        classifiers.append(clf)
        configs.append(clf_config)
        lambdas.append(text and parse_lambdas(text, clf_config["classifier"]["num_classes"]))
    target_io.check_flags(args, [c["classifier"]["num_classes"] for c in configs])
    return named_paths, classifiers, configs, lambdas


def check(args, run, config, diffusion, named_paths, classifiers, lambdas, device, world):
    """Fill the run-dependent defaults into args and check every flag (InputError). Returns what the run needs
    after sampling: real (images to invert, or None), evaluators, digits, quality (report inputs), n (samples),
    circles, tag (guidance name) and out (the output folder, not yet created)."""
    guiding = args.target is not None or any(any(l) for l in lambdas)     # every λ = 0: unguided, as none
    guide_t_min_given = args.guide_t_min is not None
    args.sample_steps = config["sample_steps"] if args.sample_steps is None else args.sample_steps
    args.guide_t_min = guide_t_min_default(config, args.edit) if args.guide_t_min is None else args.guide_t_min
    if guide_t_min_given and not guiding:
        raise InputError("--guide-t-min limits classifier guidance: it needs --lambdas with a weight other than 0 "
                         "(or drop --guide-t-min)")
    dc_run = config.get("dc_correction", False)    # the run's choice; runs from before it: off
    dc = dc_run if args.dc_correction is None else args.dc_correction
    cfg_classes = ckpt_io.backbone_config(config).get("num_classes", 0) - 1
    real = check_flags(args, config, diffusion.num_timesteps, classifiers if guiding else [], cfg_classes, world)
    evaluators = [] if real is not None else evaluator_paths(args.evaluator, config["data"], run)   # or fail now
    digits = config["data"]["name"] == "mnist" and real is None and digit_evaluator_path(run)   # or fail now
    quality = quality_inputs(args.reference, args.inception_weights, config["data"], device) if args.quality else {}
    circles = config["data"]["name"] == "circles"
    n = args.num_samples or (1000 if config["data"]["name"] in ("circles", "quadrant", "green") or digits else 10000)
    tag = target_io.tag(args, named_paths) or "_".join(f"{nm}{'-'.join(f'{v:g}' for v in l)}"
                                                       for (nm, _), l in zip(named_paths, lambdas))
    tag = "_".join(filter(None, [tag, f"cfg{args.cfg_scale:g}" if args.cfg_scale is not None else ""])) or "unguided"
    mode = "interpolate_" if args.interpolate else "edit_" if args.edit else ""
    dc_tag = "" if dc == dc_run else "_dc" if dc else "_nodc"
    t_min = args.guide_t_min
    guide_tag = ("_atmean" if args.guide_at == "mean" else "") + \
        ("" if t_min == guide_t_min_default(config, args.edit) else f"_from{t_min}")
    name = args.name or (f"{mode}{tag}_steps{args.sample_steps}{'_ddim' if args.ddim else ''}{dc_tag}{guide_tag}"
                         f"_n{n}_seed{args.seed}")
    return SimpleNamespace(real=real, evaluators=evaluators, digits=digits, quality=quality, n=n, circles=circles,
                           tag=tag, guiding=guiding, cfg=(args.cfg_scale, cfg_classes) if args.cfg_scale is not None
                           else None, out=output_dir(run, name, args.overwrite))
