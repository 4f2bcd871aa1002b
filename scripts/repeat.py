"""Repeat an experiment over guidance-classifier seeds: mean ± std as [ZSI] Sec. 5.5 (10 runs, a new classifier each).

  python -m scripts.repeat --run runs/circles --seeds 5                 # plain and spectral-norm classifiers
  python -m scripts.repeat --run runs/circles --seeds 10 --variants plain --lambdas 30,30
  python -m scripts.repeat --run runs/circles --seeds 5 --first-seed 6 --variants plain --reuse-unguided   # seeds 6-10
  python -m scripts.repeat --run runs/smile --seeds 10 --variants plain  # CelebA: KLD / "MSE" to uniform (Sec. 5.1, App. B)
  python -m scripts.repeat --run runs/mnist --seeds 3 --variants plain   # MNIST: share in the unseen thickness band

For each variant and seed s it trains a guidance classifier `<variant>_seed<s>` in the run folder on the run's data
with the run's preset (the DDPM is shared, as in the paper; an existing classifier is resumed/reused), samples
--num-samples images with multi-guidance and evaluates them as sample.py does: circles by the accuracy (one circle,
centre x/W in [0.2, 0.8]) and the 0/2+-circle rate, CelebA by the KLD and "MSE" to uniform of the histogram of the
run's evaluation classifier's p(class 1), MNIST by the share of stroke thickness in the unseen band and the digit
quality (beyond/mnist_eval.py). Writes <run>/repeats<tag>.md and repeats<tag>.json (per seed, mean ± std,
an unguided reference) and repeats<tag>.png: per variant each seed's histogram of the evaluated quantity (circle
centre x/W, p(class 1) or thickness), their mean ± std band and the unguided samples' histogram.
"""
import json
import shlex
from pathlib import Path

import numpy as np

import sample
import train
from infra.checkpoint import read_config
from cli import ArgumentParser, InputError, parse_lambdas
from infra.device import resolve_device
from evaluate import _pyplot, circle_metrics, density_axes, host_line, load_samples
from appendix.evaluator import evaluator_paths, load_evaluator, predict_probs
from beyond.mnist_eval import DIGIT_EVALUATOR
from beyond.morpho import stroke_thickness

VARIANTS = {"plain": [], "sn": ["--spectral-norm"],
            "no-mirror": ["--no-mirror-equivariant"]}   # the paper's head (the cpu circles preset is mirror-equivariant)
# per dataset: (name in repeats.json, sample.py report key without its sample-label suffix, column, shown in %)
METRICS = {"circles": [("accuracy", "accuracy_middle", "accuracy (middle)", True),
                       ("invalid", "zero_or_multi", "0 or 2+ circles", True)],
           "celeba": [("kld_paper", "kld_paper", "KLD", False), ("mse_paper", "mse_paper", '"MSE"', False),
                      ("kld_01", "kld_01", "KLD, [0, 1] bins", False), ("l2_01", "l2_01", "L2, [0, 1] bins", False)],
           "mnist": [("in_band", "in_band_samples", "in the unseen band", True),
                     ("digit_confident", "digit_confident_samples", "called a digit (p >= 0.9)", True),
                     ("fid_middle", "fid_middle_samples", "FID to the middle (digit features)", False)]}
PER_SEED = {"circles": ("middle / none / 2+ (%)", ("accuracy_middle", "zero_circles", "multi_circles"), True),
            "celeba": ("KLD / \"MSE\"", ("kld_paper", "mse_paper"), False),
            "mnist": ("band / thinner / thicker (%)", ("in_band_samples", "thinner_samples", "thicker_samples"), True)}


def report_value(report, key):
    """A number of a sample.py report; the evaluator's KLD / L2 keys carry the sample label ("guidance") as suffix."""
    return report.get(f"{key}_{report['guidance']}", report.get(key))


def evaluated_values(folder, evaluator, device, kind="circles"):
    """The quantity each sample of <folder>/samples.npz is evaluated by: circle centre x/W of the single-circle
    samples (circles), the stroke thickness in px of those with a stroke (mnist), else the evaluation classifier's
    p(class 1) [N] (the KLD's histogram, App. B)."""
    images = load_samples(folder / "samples.npz")
    if kind == "mnist":
        t = stroke_thickness(images[..., 0])
        return t[~np.isnan(t)]
    if evaluator is None:
        return circle_metrics(images)["x"]
    return predict_probs(evaluator, images, device=device)[:, 1].numpy()


def main(argv=None):
    p = ArgumentParser(prog="python -m scripts.repeat", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/circles", help="run folder with a trained DDPM (circles or celeba)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (classifiers) per variant")
    p.add_argument("--first-seed", type=int, default=1)
    p.add_argument("--variants", default="plain,sn", help="comma-separated: plain (the run's preset classifier), sn "
                                                            "(spectral norm), no-mirror (paper head, no mirror symmetry)")
    p.add_argument("--lambdas", default="30,30", help="multi-guidance weights")
    p.add_argument("--num-samples", type=int, default=None,
                   help="samples per seed (default 1000 circles, 10000 celeba)")
    p.add_argument("--train-args", default="", help="extra train.py flags for the classifiers, quoted")
    p.add_argument("--tag", default="", help="suffix of the classifier names (<variant><tag>_seed<s>): give one with "
                                             "--train-args, or the classifiers of an earlier repeat are reused")
    p.add_argument("--sample-args", default="", help="extra sample.py flags, quoted")
    p.add_argument("--evaluator", action="append", default=None,
                   help="celeba: evaluation classifier per attribute (default: found as sample.py finds it)")
    p.add_argument("--reuse-unguided", action="store_true",
                   help="take the unguided reference from an earlier repeat (samples/repeat_unguided) instead of "
                        "sampling it again (~4 min on a 2-core CPU)")
    args = p.parse_args(argv)
    run = Path(args.run)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants {unknown} unknown; choose from {list(VARIANTS)}")
    if args.seeds < 1 or args.first_seed < 0 or (args.num_samples is not None and args.num_samples < 1):
        p.error("--seeds and --num-samples must be >= 1 and --first-seed >= 0")
    if not (run / "config.json").exists():
        p.error(f"{run}/config.json not found: train the run first (python train.py --data circles --out {run})")
    config = read_config(run / "config.json")
    kind = config["data"]["name"]
    if kind not in METRICS:
        p.error(f"repeat measures circles (middle / broken circles), celeba (KLD to uniform) and mnist; {run} "
                f"holds {kind} data")
    try:
        evaluators = evaluator_paths(args.evaluator, config["data"], run)   # a CelebA run without one: InputError
        parse_lambdas(args.lambdas, config["classifier"]["num_classes"])
    except InputError as e:
        p.error(str(e))
    args.num_samples = args.num_samples or (10000 if kind == "celeba" else 1000)
    extra_sample = shlex.split(args.sample_args) + ["--num-samples", str(args.num_samples), "--run", str(run)]
    extra_sample += [a for e in args.evaluator or [] for a in ("--evaluator", e)]
    if args.train_args and not args.tag:
        p.error("--train-args changes the classifiers: give them a --tag (e.g. --tag _b32) so that classifiers "
                "trained earlier under the same names are not reused")
    data_args = ["--data", kind, "--preset", config["train"].get("preset", "cpu")]
    data_args += ["--data-dir", config["data"]["path"]] if config["data"].get("path") else []

    def train_args(variant, seed):
        name = f"{variant}{args.tag}_seed{seed}"       # trained before: continued (--resume refuses a missing one)
        return ["--out", str(run), *data_args, "--what", "classifier", "--seed", str(seed), "--classifier-name", name,
                *(["--resume"] if (run / f"{name}.pt").exists() else []), *VARIANTS[variant],
                *shlex.split(args.train_args)]
    for variant in variants:                      # train.py's checks of the classifiers' flags, before any work
        train.main(train_args(variant, args.first_seed), check_only=True)
    results = {}
    ref = run / "samples" / "repeat_unguided" / "report.json"
    if args.reuse_unguided:
        if not ref.exists():
            p.error(f"--reuse-unguided: {ref} is missing; run once without --reuse-unguided")
        drawn = json.loads(ref.read_text())["num_samples"]
        if drawn != args.num_samples:
            p.error(f"--reuse-unguided: {ref} has {drawn} samples, not --num-samples {args.num_samples}; "
                    f"run without --reuse-unguided")
    else:
        ref = sample.main(["--name", "repeat_unguided", "--overwrite", *extra_sample]) / "report.json"
    device = resolve_device("auto")
    evaluator = load_evaluator(evaluators[0], device)[0] if kind == "celeba" else None
    results["unguided"] = [json.loads(ref.read_text())]
    values = {"unguided": [evaluated_values(ref.parent, evaluator, device, kind)]}
    for variant in variants:
        results[variant + args.tag], values[variant + args.tag] = [], []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            name = f"{variant}{args.tag}_seed{seed}"
            train.main(train_args(variant, seed))
            out = sample.main(["--classifier", name, "--lambdas", args.lambdas, "--name", f"repeat_{name}",
                               "--overwrite", *extra_sample])
            results[variant + args.tag].append(dict(json.loads((out / "report.json").read_text()), seed=seed))
            values[variant + args.tag].append(evaluated_values(out, evaluator, device, kind))
            write_tables(run, results, values, args, kind, evaluators)
    return write_tables(run, results, values, args, kind, evaluators)


def write_tables(run, results, values, args, kind, evaluators):
    """repeats<tag>.md / .json / .png of the runs so far; returns the summary written to the .json."""
    metrics = METRICS[kind]
    title = {"circles": "Circles", "celeba": "CelebA", "mnist": "MNIST stroke thickness"}[kind]
    lines = [f"# {title} over seeds: λ = {args.lambdas}, {args.num_samples} samples each", "",
             "| variant | runs | " + " | ".join(f"{col} mean ± std" for _, _, col, _ in metrics)
             + f" | per seed: {PER_SEED[kind][0]} |", "|---" * (len(metrics) + 3) + "|"]
    std = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0
    show = lambda v, pct: f"{100 * v:.1f}" if pct else f"{v:.3f}"
    summary = {}
    for variant, rows in results.items():
        summary[variant] = dict(runs=len(rows))
        cells = []
        for name, key, _, pct in metrics:
            a = np.array([report_value(r, key) for r in rows], dtype=float)
            summary[variant].update({f"{name}_mean": float(a.mean()), f"{name}_std": std(a)})
            cells.append(f"{show(a.mean(), pct)}{'%' if pct else ''} ± {show(std(a), pct)}")
        _, keys, pct = PER_SEED[kind]
        per_seed = ", ".join(" / ".join(show(report_value(r, k), pct) for k in keys) for r in rows)
        lines.append(f"| {variant} | {len(rows)} | " + " | ".join(cells) + f" | {per_seed} |")
        summary[variant]["per_seed"] = rows
    if kind == "circles":
        note = ("Paper (10 runs, 64px): 78% ± 8.7 (plain), 75% ± 13.3 (spectral norm), 4.25% ± 2.45 with 0 or 2 "
                "circles.")
        xlabel, bins, log, marks, span = "circle centre x / W (single-circle samples)", 50, False, (0.2, 0.8), (0, 1)
    elif kind == "mnist":
        r = results["unguided"][0]
        marks = (r["band_low"], r["band_high"])
        note = (f"Unseen band: stroke thickness strictly inside ({marks[0]:.2f}, {marks[1]:.2f}) px, between the "
                f"thickest thin and the thinnest thick training digit; digit quality by {DIGIT_EVALUATOR}.")
        xlabel, bins, log = "stroke thickness (px)", 60, False
        span = (0, max([float(np.max(v)) for vs in values.values() for v in vs if len(v)] + [2 * marks[1]]))
    else:
        note = (f"Evaluation classifier {evaluators[0].name}; KLD / \"MSE\" (an L2 norm) of its p(class 1) histogram "
                f"to uniform, 100 bins over the samples' [min, max] as the paper's code ([ZSI] App. B), and over "
                f"[0, 1].")
        xlabel, bins, log, marks, span = f"evaluation classifier p(class 1) ({evaluators[0].stem})", 100, True, (0.5,), (0, 1)
    seeded = {v: runs for v, runs in values.items() if v != "unguided"}
    if seeded:
        bands = plot_seed_histograms(seeded, run / f"repeats{args.tag}.png", xlabel, bins=bins, log=log, marks=marks,
                                     reference={"unguided": values["unguided"][0]}, span=span)
        for v, (edges, mean, sd) in bands.items():
            summary[v]["histogram"] = dict(edges=edges.tolist(), mean=mean.tolist(), std=sd.tolist())
    lines += ["", f"std: sample standard deviation over runs (ddof=1). {note} Classifier seeds: the per-seed column "
              f"in order; sampling seed and host: each run's report.json.", "",
              f"![each seed's histogram and the mean ± std band](repeats{args.tag}.png)", "",
              f"Host: {host_line(next(iter(results.values()))[0].get('host'))}."]
    (run / f"repeats{args.tag}.md").write_text("\n".join(lines) + "\n")
    (run / f"repeats{args.tag}.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print("\n".join(lines), flush=True)
    return summary


def plot_seed_histograms(named_runs, path, xlabel, bins=50, span=(0, 1), log=False, marks=(0.2, 0.8), reference=None):
    """Repeats over seeds, as the paper's mean ± std over runs ([ZSI] Sec. 5.5): one panel per variant of
    `named_runs` ({variant: [values of seed 1, values of seed 2, ...]}) with each seed's density histogram as a
    thin step line, their mean as a thick line and mean ± std (ddof=1; 0 for one seed; cut at 0) as a band; `reference`
    ({name: values}, e.g. unguided samples) dashed in every panel. Densities as evaluate.plot_histograms's
    (np.histogram with density=True over `span`; a seed without values counts as 0 everywhere). A 5.5·V × 3.6
    inch figure at 120 dpi for V variants. Returns {variant: (edges [bins + 1], mean [bins], std [bins])}."""
    edges = np.linspace(span[0], span[1], bins + 1)

    def density(v):
        return np.histogram(np.asarray(v, dtype=float), bins=edges, density=True)[0] if len(v) else np.zeros(bins)

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(named_runs), figsize=(5.5 * len(named_runs), 3.6), squeeze=False)
    stats = {}
    for ax, (variant, runs) in zip(axes[0], named_runs.items()):
        d = np.stack([density(v) for v in runs])                                   # [seeds, bins]
        mean, sd = d.mean(0), (d.std(0, ddof=1) if len(d) > 1 else np.zeros(bins))
        stats[variant] = (edges, mean, sd)
        for row in d:
            ax.stairs(row, edges, color="C0", alpha=0.35, lw=0.8)
        ax.stairs(mean + sd, edges, baseline=np.maximum(mean - sd, 0), fill=True, color="C0", alpha=0.25,
                  label=f"mean ± std over {len(d)} seeds")
        ax.stairs(mean, edges, color="C0", lw=2, label="mean")
        for k, (name, v) in enumerate((reference or {}).items()):
            ax.stairs(density(v), edges, color=f"C{k + 1}", ls="--", lw=1.2, label=name)
        ax.set_title(variant, fontsize=9)
        density_axes(ax, xlabel, marks, log, legend_size=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return stats


if __name__ == "__main__":
    main()
