"""Sampling at a chosen level between the two trained extremes: `sample.py --target L` ([ZSI] Sec. 8.2's open problem).

The paper's multi-guidance λ = (30, 30) spreads samples over the whole unseen middle; its Sec. 8.2 leaves "reliable
sampling over a narrow range of the latents" open and points to MCMC samplers [RRR]. Here a sample's *level* is the
latent factor the two classes are extremes of: on circles the disc centre x/W, on MNIST the stroke thickness in px.
Data without such a measure (CelebA, folders) take the target probability q of class 1 itself as the level.

Zero-shot, as the paper's experiments: the level is turned into a target for the guidance classifier using only the
classifier and the training extremes, never an image from the gap.
  1. relative position  r = (L − m_0) / (m_1 − m_0), m_k the mean level of class k's training images;
  2. target q for p(class 1 | x_t, t), by `--target-map`:
       linear: q = r, clipped to [0.01, 0.99] (symmetry: the midpoint of the extremes gets q = 1/2);
       logit:  q_t = σ((1 − r)·f̄_0(t) + r·f̄_1(t)), f̄_k(t) the classifier's mean logit log p_1 − log p_0 on class-k
               training images noised to t: the logit a level-L image would get if the logit were linear in the
               level between the extremes (changes with t: noisy classifiers are less sure);
  3. target_guidance.target_guidance towards q with scale λ (loss kl: multi-guidance with the asymmetric weights
     λ·(1 − q, q), fixed point p(class 1 | x_t) = q; loss mse / logit: a squared error on p / on its logit), of the
     classifier or of its average over S small shifts (target_guidance.shift_averaged: removes the saw-tooth in p that a
     strided classifier shows across the gap), optionally with Langevin corrector steps on the guided score at
     every guided level (target_guidance.langevin_step, [RRR] Sec. 4), and optionally sequential Monte Carlo: the batch is
     weighted every SMC_EVERY steps by the potential exp(−K/2 (f − f*)²) of the same classifier's logit f and target
     f* and resampled (target_guidance.target_potential and p_sample_loop(resample=...), [FK] Sec. 3): a narrower spread
     for copies among the samples (target_report's distinct centres). The population is the batch: --batch-size
     sets it (64 on CPU, 256 on CUDA), and a last batch of one sample is not resampled.
`target_report` measures what came out: median and interquartile range of the level, broken samples (circles:
0 or 2+ discs; MNIST: no stroke) and a histogram with the target marked.
"""
import functools

import numpy as np
import torch

from cli import GUIDANCE_MAX, InputError, check_unused, finite_float
from data import load_data
from evaluate import detect_circles, plot_histograms
from beyond.target_guidance import p_sample_loop, shift_averaged, target_guidance, target_potential
from beyond.mnist import mnist_split
from beyond.morpho import stroke_thickness

LEVELS = {"circles": "disc centre x/W", "mnist": "stroke thickness (px)"}   # else: q = p(class 1) itself
MAPS = ("linear", "logit")
LOSSES = ("kl", "mse", "logit")
Q_CLIP = 0.01
SMC_EVERY = 4       # --smc-scale: weigh and resample after every 4th of the sampling steps (and the last)
SMC_MAX = 1e6       # --smc-scale above this: the potential −K/2·(f − f*)² overflows float32 for |f − f*| ≳ 1e16
# sample.py's --target defaults: chosen on circles with spectral-norm classifiers whose zero-initialised layers had
# not trained (classifier seed 0 tuned them); with fully trained classifiers no method compared aims (RESULTS.md)
DEFAULTS = dict(target_map="linear", target_loss="logit", target_scale=150.0, target_shifts=4, corrector_steps=0,
                corrector_size=0.5, smc_scale=0.0)


def add_arguments(parser):
    """sample.py's --target flags, one group. Defaults: see DEFAULTS (RESULTS.md: none of the methods aims)."""
    g = parser.add_argument_group("target level (sampling at a chosen point of the gap; not in the paper; defaults: "
                                  + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in DEFAULTS.items()) + ")")
    g.add_argument("--target", type=finite_float, default=None, metavar="L",
                   help="sample at level L between the trained extremes: circles centre x/W (e.g. 0.35), MNIST stroke "
                        "thickness in px, other data the probability of class 1; uses the --classifier (2 classes)")
    g.add_argument("--target-map", choices=MAPS, default=None,
                   help="level -> target probability q, from the training extremes only: linear (q = relative "
                        "position) or logit (the classifier's logits on the noised extremes, interpolated)")
    g.add_argument("--target-loss", choices=LOSSES, default=None,
                   help="kl: multi-guidance with the weights λ·(1 − q, q); mse: the gradient of −λ/2 (p − q)²; logit: "
                        "of −λ/2 (f − log(q/(1 − q)))², f the classifier's logit difference")
    g.add_argument("--target-scale", type=finite_float, default=None,
                   help="λ of the target guidance (kl: 60 at q = 1/2 is the paper's λ = 30, 30)")
    g.add_argument("--target-shifts", type=int, default=None,
                   help="average the classifier over this many diagonal shifts of 1 px (target_guidance.shift_averaged; 4 "
                        "removes the saw-tooth of a classifier that downsamples by 4)")
    g.add_argument("--corrector-steps", type=int, default=None,
                   help="Langevin corrector steps on the guided score before each guided predictor step (ULA)")
    g.add_argument("--corrector-size", type=finite_float, default=None,
                   help="corrector step ε = this · β_t of the sampling chain, in (0, 2) (2: ULA stops contracting)")
    g.add_argument("--smc-scale", type=finite_float, default=None, metavar="K",
                   help=f"sequential Monte Carlo: each batch (--batch-size samples) is a population, weighed every "
                        f"{SMC_EVERY} steps by exp(−K/2 (f − f*)²), f the classifier's logit, f* the target's, and "
                        f"resampled (0: off; needs batches of 2 or more); narrower, but leaves copies")


def check_flags(args, classifier_classes):
    """sample.py's checks of the --target flags (InputError), which it fills with DEFAULTS where not given.
    classifier_classes: classes of each --classifier."""
    given = [k for k in DEFAULTS if getattr(args, k) is not None]
    if args.target is None:
        if given:
            raise InputError(f"--{given[0].replace('_', '-')} shapes --target sampling: add --target L")
        return
    for k, v in DEFAULTS.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.lambdas or classifier_classes != [2]:
        raise InputError("--target guides with one two-class classifier and its own weights: drop --lambdas and "
                         "pass at most one --classifier")
    if args.cfg_scale is not None or args.ddim or args.interpolate or args.edit or args.guide_at != "x_t":
        raise InputError("--target runs ancestral sampling with classifier guidance: drop --cfg-scale, --ddim, "
                         "--interpolate, --edit and --guide-at")
    # ranges where sampling stays finite: a guidance weight up to GUIDANCE_MAX; the Langevin step ε = c·β_t with
    # β_t <= 1 − ᾱ_t contracts the Gaussian part by |1 − c·β_t/(1 − ᾱ_t)| < 1 only for c < 2 (target_guidance.langevin_step)
    if not (np.isfinite(args.target) and 0 < args.target_scale <= GUIDANCE_MAX and args.corrector_steps >= 0
            and 0 < args.corrector_size < 2 and 1 <= args.target_shifts <= 8 and 0 <= args.smc_scale <= SMC_MAX):
        raise InputError(f"--target must be a finite level, --target-scale and --corrector-size positive "
                         f"(--target-scale at most {GUIDANCE_MAX:g}, --corrector-size below 2, where sampling stays "
                         f"finite), --corrector-steps >= 0, --smc-scale in [0, {SMC_MAX:g}] and --target-shifts in "
                         f"1..8; got {args.target}, {args.target_scale}, {args.corrector_size}, {args.corrector_steps}, "
                         f"{args.smc_scale}, {args.target_shifts}")
    check_unused(args, [("corrector_size", args.corrector_steps > 0, "it sizes the steps of --corrector-steps K > 0")])
    if args.smc_scale and args.batch_size < 2:
        raise InputError(f"--smc-scale resamples within each batch: use --batch-size 2 or more (got {args.batch_size})")


def tag(args, named_paths):
    """Folder tag of a --target run, e.g. classifier_target0.35_linear_kl60_pc1x0.5_smc20; "" without --target."""
    if args.target is None:
        return ""
    corrector = f"_pc{args.corrector_steps}x{args.corrector_size:g}" if args.corrector_steps else ""
    shifts = f"_shift{args.target_shifts}" if args.target_shifts > 1 else ""
    return (f"{named_paths[0][0]}_target{args.target:g}_{args.target_map}_{args.target_loss}{args.target_scale:g}"
            f"{shifts}{corrector}{f'_smc{args.smc_scale:g}' if args.smc_scale else ''}")


def label(args):
    """Legend name of a --target sample set ("target 0.35"); "" without --target."""
    return "" if args.target is None else f"target {args.target:g}"


# ---------------------------------------------------------------------------------------------------
# Levels
# ---------------------------------------------------------------------------------------------------

def measure_levels(images, data_config):
    """The level of each image, float [N] with NaN where it has none (circles: not exactly one disc; MNIST: no
    stroke), or None for data without a level measure. images: uint8 [N, H, W, C]."""
    name = data_config["name"]
    if name == "circles":
        width = images.shape[2]
        return np.array([c[0, 0] / width if n == 1 else np.nan for n, c, _ in detect_circles(images)])
    if name == "mnist":
        return stroke_thickness(images[..., 0])
    return None


def distinct_centres(images, batch_size):
    """Circles: per batch of `batch_size` samples (one population of ddpm's resampling), the distinct disc centres
    (whole pixels) over the samples with one disc, averaged over the batches; NaN without such samples. Lower when
    resampling leaves copies; samples drawn independently share a centre only by chance. images: uint8 [N, H, W, C]."""
    shares = []
    for i in range(0, len(images), batch_size):
        centres = [tuple(np.round(c[0]).astype(int)) for n, c, _ in detect_circles(images[i:i + batch_size]) if n == 1]
        shares += [len(set(centres)) / len(centres)] if centres else []
    return float(np.mean(shares)) if shares else float("nan")


def extreme_levels(data_config):
    """(m_0, m_1): mean level of the class-0 and class-1 training images, or None without a level measure."""
    if data_config["name"] == "mnist":
        split = mnist_split(data_config)
        levels, labels = split["thickness"][split["split"] >= 0], split["labels"]
    elif data_config["name"] == "circles":
        images, labels = load_data(data_config)
        levels = measure_levels(images, data_config)
    else:
        return None
    return tuple(float(np.nanmean(levels[labels == k])) for k in (0, 1))


def relative_position(level, extremes):
    """r = (L − m_0) / (m_1 − m_0): 0 at the class-0 extreme's mean level, 1 at class 1's; L itself without one."""
    return level if extremes is None else (level - extremes[0]) / (extremes[1] - extremes[0])


# ---------------------------------------------------------------------------------------------------
# Level -> target probability, and the guidance
# ---------------------------------------------------------------------------------------------------

def linear_q(r):
    """q = (1 − r, r) with r clipped to [Q_CLIP, 1 − Q_CLIP] (log p of a target 0 would pull without bound)."""
    r = float(np.clip(r, Q_CLIP, 1 - Q_CLIP))
    return torch.tensor([1 - r, r])


def logit_q(classifier, diffusion, images, labels, r, device, per_class=128, seed=0):
    """q_t = σ((1 − r)·f̄_0(t) + r·f̄_1(t)) as a function t [N] -> [N, 2] (module docstring, step 2).

    f̄_k(t): mean of log p_1 − log p_0 of `classifier` on `per_class` class-k images (uint8 [N, H, W, C], labels [N])
    noised to t with `diffusion` (the full chain, original timesteps), one fixed noise draw; computed once per t.
    """
    gen = torch.Generator().manual_seed(seed)
    picks = [np.flatnonzero(labels == k)[:per_class] for k in (0, 1)]
    x0 = [torch.from_numpy(images[p]).permute(0, 3, 1, 2).float().div(127.5).sub(1) for p in picks]
    noise = [torch.randn(x.shape, generator=gen) for x in x0]
    cache = {}

    def mean_logit(k, t):
        tt = torch.full((len(x0[k]),), t, dtype=torch.long)
        with torch.no_grad():
            log_p = torch.log_softmax(classifier(diffusion.q_sample(x0[k], tt, noise[k]).to(device),
                                                 tt.to(device)).float(), -1)
        return float((log_p[:, 1] - log_p[:, 0]).mean())

    def target(t):
        out = []
        for ti in t.tolist():
            if ti not in cache:
                f = (1 - r) * mean_logit(0, ti) + r * mean_logit(1, ti)
                q1 = float(np.clip(1 / (1 + np.exp(-f)), Q_CLIP, 1 - Q_CLIP))
                cache[ti] = [1 - q1, q1]
            out.append(cache[ti])
        return torch.tensor(out)

    return target


def target_sampler(args, classifier, diffusion, chain, data_config, device):
    """(cond_fn, loop, info) for sample.py --target: target_guidance towards the q of args.target_map (module
    docstring), and the sampler: None (the paper's ancestral loop), or target_guidance.p_sample_loop on `chain` with
    --corrector-steps Langevin steps at t >= args.guide_t_min and, with --smc-scale K > 0, resampling on
    target_potential. diffusion: the full chain (the logit map noises the extremes on it). info: target, extremes
    (m_0, m_1 or None), relative position r, q (a float, or "t-dependent")."""
    extremes = extreme_levels(data_config)
    r = relative_position(args.target, extremes)
    classifier = shift_averaged(classifier, args.target_shifts)
    if args.target_map == "logit":
        images, labels = load_data(data_config)
        q, q_text = logit_q(classifier, diffusion, images, labels, r, device), "t-dependent"
    else:
        q = linear_q(r)
        q_text = float(q[1])
    info = dict(target=args.target, target_map=args.target_map, target_loss=args.target_loss,
                target_scale=args.target_scale, target_shifts=args.target_shifts, corrector_steps=args.corrector_steps,
                corrector_size=args.corrector_size, smc_scale=args.smc_scale, batch_size=args.batch_size,
                extremes=extremes, relative_position=r, q=q_text)
    potential = (target_potential(classifier, q, args.smc_scale), SMC_EVERY) if args.smc_scale else None
    corrector = (args.corrector_steps, args.corrector_size, args.guide_t_min) if args.corrector_steps else None
    loop = None if potential is None and corrector is None else \
        functools.partial(p_sample_loop, chain, corrector=corrector, resample=potential)
    return target_guidance(classifier, q, args.target_scale, args.target_loss), loop, info


# ---------------------------------------------------------------------------------------------------
# What came out
# ---------------------------------------------------------------------------------------------------

def level_stats(levels, target):
    """median, q25, q75, iqr of the measured levels, |median − target| (`error`) and the `broken` share (NaN)."""
    v = np.asarray(levels, dtype=np.float64)
    measured = v[~np.isnan(v)]
    q25, med, q75 = np.percentile(measured, [25, 50, 75]) if len(measured) else [float("nan")] * 3
    return dict(level_median=float(med), level_q25=float(q25), level_q75=float(q75), level_iqr=float(q75 - q25),
                level_error=float(abs(med - target)), broken=float(np.isnan(v).mean()))


def target_report(samples, info, data_config, out, label):
    """sample.py's report for --target: level_stats of the samples (none for data without a level measure), on
    circles distinct_centres, and histogram_level.png: the samples' levels, the training extremes', the target
    marked."""
    report = dict(info)
    levels = measure_levels(samples, data_config)
    if levels is None:
        return report
    report.update(level_stats(levels, info["target"]))
    if data_config["name"] == "circles":
        report["distinct_centres"] = distinct_centres(samples, info["batch_size"])
    train_images, _ = load_data(data_config)
    train_levels = measure_levels(train_images, data_config)
    plot_histograms({"training extremes": train_levels[~np.isnan(train_levels)],
                     label: levels[~np.isnan(levels)]}, out / "histogram_level.png", LEVELS[data_config["name"]],
                    bins=80, span=None, marks=(info["target"],))
    print(f"[sample] target {info['target']:g}: median {report['level_median']:.3f}, IQR {report['level_iqr']:.3f} "
          f"({report['level_q25']:.3f}-{report['level_q75']:.3f}), broken {report['broken'] * 100:.1f}%"
          + (f", distinct centres {report['distinct_centres'] * 100:.0f}% per batch" if "distinct_centres" in report
             else ""), flush=True)
    return report
