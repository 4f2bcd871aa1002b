"""Compare ways of sampling at a chosen level of the gap (beyond/target.py) over targets and guidance-classifier seeds.

  python -m scripts.target_sweep --classifier classifier,classifier_sn --profiles-only --name profiles   # can they aim?
  python -m scripts.target_sweep --classifier classifier_sn,sn_seed1,sn_seed2                           # the default method
  python -m scripts.target_sweep --classifier classifier_sn --method kl60="--target-loss kl --target-scale 60" \\
      --method logit150="--target-loss logit --target-scale 150"
  python -m scripts.target_sweep --run runs/mnist --targets 2.2,2.5,2.8 --num-samples 200

For every classifier it samples plain multi-guidance (--baseline, the paper's λ = 30, 30: the spread and cost the
methods are measured against), then each method at each target with sample.py --target, and collects from each
report the level's median, interquartile range and broken share (circles: also the distinct centres per batch,
target.distinct_centres). Writes <run>/target_sweeps/<name>/ with
target_sweep.md / .json (one row per method, target and classifier; per method the worst |median − target| and IQR
over targets and classifiers, the broken share and the cost per sample relative to the baseline, same host, same
process), achieved.png (achieved vs requested level: per classifier the median with q25–q75 bars, the diagonal for
reference), grid_targets.png (a row of samples per target: the first method, the first classifier) and, on
circles, profiles.png: each classifier's p(class 1 | a disc at x) across the gap, as it is and over 4 shifts.
The samples stay in <run>/samples/ (folders target_<name>_<method>_<classifier>_<target>).
"""
import argparse
import json
import shlex
from pathlib import Path

import numpy as np

import sample
from infra.checkpoint import load_classifier, read_config
from cli import ArgumentParser, InputError, one_line_errors
from data import save_grid
from evaluate import _pyplot, classifier_heatmap, host_line, load_samples
from beyond.target_guidance import shift_averaged
from beyond.target import LEVELS, level_stats, measure_levels

GOAL = dict(error=0.03, iqr=0.08, broken=0.05, cost=3.0)    # circles, in x/W; the acceptance bar


def parse_methods(texts):
    """{name: [sample.py flags]} from NAME=FLAGS strings; default {"default": []} (sample.py's --target defaults)."""
    methods = {}
    for text in texts or ["default="]:
        name, sep, flags = text.partition("=")
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum() or name in methods:
            raise InputError(f"--method takes NAME=FLAGS with a new alphanumeric NAME, e.g. "
                             f"asym200=\"--target-scale 200\"; got {text!r}")
        methods[name] = shlex.split(flags)
    return methods


def parse_floats(text, flag):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(values)):
        raise InputError(f"{flag} takes comma-separated numbers, e.g. 0.3,0.5,0.7; got {text!r}")
    return values


def summary(rows, baseline_seconds):
    """Per method: worst |median − target| and IQR over its rows, mean broken share, cost relative to the baseline."""
    out = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        cost = np.mean([r["seconds_per_sample"] / baseline_seconds[r["classifier"]]     # NaN where a clock read 0
                        if baseline_seconds[r["classifier"]] > 0 else np.nan for r in mine])
        out[m] = dict(worst_error=max(r["level_error"] for r in mine), worst_iqr=max(r["level_iqr"] for r in mine),
                      mean_error=float(np.mean([r["level_error"] for r in mine])),
                      mean_iqr=float(np.mean([r["level_iqr"] for r in mine])),
                      broken=float(np.mean([r["broken"] for r in mine])),
                      worst_broken=max(r["broken"] for r in mine), cost=float(cost))
    return out


def plot_achieved(rows, baselines, path, xlabel):
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    classifiers = list(dict.fromkeys(r["classifier"] for r in rows))
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 4), squeeze=False)
    targets = sorted({r["target"] for r in rows})
    span = (targets[-1] - targets[0]) or 1.0
    for ax, m in zip(axes[0], methods):
        for j, c in enumerate(classifiers):
            mine = sorted((r for r in rows if r["method"] == m and r["classifier"] == c), key=lambda r: r["target"])
            x = np.array([r["target"] for r in mine]) + (j - (len(classifiers) - 1) / 2) * 0.012 * span
            med = np.array([r["level_median"] for r in mine])
            err = [med - [r["level_q25"] for r in mine], [r["level_q75"] for r in mine] - med]
            ax.errorbar(x, med, yerr=err, fmt="o", capsize=3, label=c)
        for c, b in baselines.items():
            ax.axhspan(b["level_q25"], b["level_q75"], color="0.85", zorder=0)
        lo, hi = targets[0] - 0.15 * span, targets[-1] + 0.15 * span
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"requested {xlabel}")
        ax.set_ylabel(f"achieved {xlabel}: median, q25-q75")
        ax.set_title(f"{m} (grey: λ = 30, 30 q25-q75)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_profiles(run, classifiers, data_config, ts, path, targets, shifts=4):
    """Circles: each classifier's p(class 1 | one disc at x, t), averaged over the disc's row y, at the timesteps ts
    (evaluate.classifier_heatmap), as it is (dashed) and averaged over `shifts` shifts (solid, target_guidance.shift_averaged):
    how well p tells levels apart, which bounds every method of beyond/target.py."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(classifiers), figsize=(4 * len(classifiers), 3.4), squeeze=False)
    profiles = {}
    for ax, c in zip(axes[0], classifiers):
        clf, _ = load_classifier(run / f"{c}.pt")
        for t, color in zip(ts, ("C0", "C1", "C2", "C3")):
            for s, style in ((1, "--"), (shifts, "-")):
                heat, coords = classifier_heatmap(shift_averaged(clf, s), data_config["image_size"],
                                                  data_config["radius"], t=t)
                profiles[f"{c}_t{t}_shifts{s}"] = heat.mean(0).tolist()
                ax.plot(coords / data_config["image_size"], heat.mean(0), style, color=color, ms=3,
                        label=f"t = {t}, {s} shift{'s' * (s > 1)}")
        for level in targets:
            ax.axvline(level, color="0.7", lw=0.8)
        ax.set_xlabel("disc centre x/W")
        ax.set_ylabel("p(class 1 | x), mean over y")
        ax.set_title(c, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return dict(coords=(coords / data_config["image_size"]).tolist(), **profiles)


def main(argv=None):
    p = ArgumentParser(prog="python -m scripts.target_sweep", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/circles", help="run folder with ddpm.pt and the guidance classifiers")
    p.add_argument("--targets", default="0.3,0.4,0.5,0.6,0.7", help="levels (circles x/W, MNIST px)")
    p.add_argument("--classifier", default="classifier",
                   help="comma-separated guidance classifiers in the run, e.g. classifier,plain_seed1,plain_seed2")
    p.add_argument("--method", action="append", default=None, metavar="NAME=FLAGS",
                   help="a method: sample.py --target flags, quoted (repeatable); default: sample.py's defaults")
    p.add_argument("--baseline", default="30,30", help="λ of the plain multi-guidance reference")
    p.add_argument("--num-samples", type=int, default=1000, help="per target, method and classifier")
    p.add_argument("--name", default="default", help="folder name under <run>/target_sweeps")
    p.add_argument("--sample-args", default="", help="extra sample.py flags for every call, e.g. '--seed 1'")
    p.add_argument("--profiles-only", action="store_true",
                   help="circles: only draw profiles.png / profiles.json (can each classifier tell the levels apart?)")
    args = p.parse_args(argv)
    run = Path(args.run)
    with one_line_errors("python -m scripts.target_sweep"):
        if not (run / "ddpm.pt").exists():
            raise InputError(f"{run}/ddpm.pt not found; train first or pass --run DIR")
        targets = parse_floats(args.targets, "--targets")
        methods = parse_methods(args.method)
        classifiers = [c for c in args.classifier.split(",") if c]
        missing = [c for c in classifiers if not (run / f"{c}.pt").exists()]
        if missing or not classifiers or args.num_samples < 1:
            raise InputError(f"--classifier {missing[0] if missing else args.classifier!r}: not in {run} (train it "
                             f"with scripts/repeat.py or train.py --what classifier) or --num-samples < 1")
        data_config = read_config(run / "config.json")["data"]
        for flags in methods.values():                       # sample.py's flag checks, before any sampling
            sample.parse_args(["--target", "0", *flags])
        if args.profiles_only and data_config["name"] != "circles":
            raise InputError("--profiles-only draws p(class 1 | a disc at x): circles runs only")
    folder = run / "target_sweeps" / args.name
    if args.profiles_only:
        folder.mkdir(parents=True, exist_ok=True)
        profiles = plot_profiles(run, classifiers, data_config, (0, read_config(run / "config.json").get(
            "guide_t_min", 0)), folder / "profiles.png", targets)
        (folder / "profiles.json").write_text(json.dumps(profiles, indent=2) + "\n")
        print(f"done: {folder}", flush=True)
        return folder
    common = ["--run", str(run), "--num-samples", str(args.num_samples), "--overwrite", *shlex.split(args.sample_args)]
    rows, baselines, host = [], {}, None
    for c in classifiers:
        out = sample.main([*common, "--classifier", c, "--lambdas", args.baseline,
                           "--name", f"target_{args.name}_baseline_{c}"])
        rep = json.loads((out / "report.json").read_text())
        baselines[c] = dict(seconds_per_sample=rep["seconds"] / rep["num_samples"], folder=str(out),
                            **baseline_levels(out, data_config))
        for m, flags in methods.items():
            for level in targets:
                out = sample.main([*common, "--classifier", c, "--target", f"{level:g}", *flags,
                                   "--name", f"target_{args.name}_{m}_{c}_{level:g}"])
                rep = json.loads((out / "report.json").read_text())
                host = rep.get("host")
                rows.append(dict(method=m, classifier=c, target=level, flags=" ".join(flags), q=rep["q"],
                                 seconds_per_sample=rep["seconds"] / rep["num_samples"], folder=str(out),
                                 distinct=rep.get("distinct_centres", float("nan")),
                                 **{k: rep[k] for k in ("level_median", "level_q25", "level_q75", "level_iqr",
                                                        "level_error", "broken")}))
    folder.mkdir(parents=True, exist_ok=True)
    per_method = summary(rows, {c: b["seconds_per_sample"] for c, b in baselines.items()})
    plot_achieved(rows, baselines, folder / "achieved.png", LEVELS.get(data_config["name"], "p(class 1)"))
    profiles = (plot_profiles(run, classifiers, data_config, (0, read_config(run / "config.json").get("guide_t_min", 0)),
                              folder / "profiles.png", targets) if data_config["name"] == "circles" else {})
    first = [r for r in rows if r["method"] == rows[0]["method"] and r["classifier"] == classifiers[0]]
    strip = [load_samples(Path(r["folder"]) / "samples.npz")[:10] for r in first]
    save_grid(np.concatenate(strip), folder / "grid_targets.png", nrow=min(10, len(strip[0])),
              scale=max(1, 64 // strip[0].shape[1]))
    (folder / "target_sweep.json").write_text(json.dumps(dict(rows=rows, baselines=baselines, methods=per_method,
                                                              profiles=profiles, host=host, args=vars(args)), indent=2) + "\n")
    lines = write_tables(run, rows, baselines, per_method, methods, host, args, data_config["name"] == "circles")
    (folder / "target_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"done: {folder}", flush=True)
    return folder


def baseline_levels(folder, data_config):
    """level_stats of a baseline's samples (no target: its level_error is NaN); {} for data without levels."""
    levels = measure_levels(load_samples(folder / "samples.npz"), data_config)
    return {} if levels is None else level_stats(levels, float("nan"))


def _number(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _percent(v):
    return "—" if np.isnan(v) else f"{v * 100:.0f}%"


def meets_goal(s):
    """The circles goal: every |median − target| <= 0.03 and IQR <= 0.08, <= 5% broken, <= 3× the cost."""
    return (s["worst_error"] <= GOAL["error"] and s["worst_iqr"] <= GOAL["iqr"] and s["worst_broken"] <= GOAL["broken"]
            and s["cost"] <= GOAL["cost"])


def write_tables(run, rows, baselines, per_method, methods, host, args, circles=False):
    lines = [f"# Target-level sampling on {run}", "",
             f"{args.num_samples} samples per target, method and classifier; level: see beyond/target.py.", "",
             "| method | flags | worst \\|median − target\\| | worst IQR | mean broken | worst broken | cost vs λ = "
             f"{args.baseline} |" + (" meets the goal |" if circles else ""), "|---" * (7 + circles) + "|"]
    for m, s in per_method.items():
        lines.append(f"| {m} | `{' '.join(methods[m])}` | {s['worst_error']:.3f} | {s['worst_iqr']:.3f} | "
                     f"{s['broken'] * 100:.1f}% | {s['worst_broken'] * 100:.1f}% | {s['cost']:.2f}× |"
                     + (f" {'yes' if meets_goal(s) else 'no'} |" if circles else ""))
    lines += ["", f"Baseline λ = {args.baseline} per classifier: " + "; ".join(
        f"{c}: median {b.get('level_median', float('nan')):.3f}, IQR {b.get('level_iqr', float('nan')):.3f}"
        for c, b in baselines.items()), "",
        "| method | classifier | target | q | median | q25 | q75 | IQR | broken | distinct centres | s/sample |",
        "|---" * 11 + "|"]
    lines += [f"| {r['method']} | {r['classifier']} | {r['target']:g} | {_number(r['q'])} | {r['level_median']:.3f} | {r['level_q25']:.3f} | {r['level_q75']:.3f} | {r['level_iqr']:.3f} | "
              f"{r['broken'] * 100:.1f}% | {_percent(r['distinct'])} | {r['seconds_per_sample']:.3f} |" for r in rows]
    lines += ["", "![achieved](achieved.png) ![grid](grid_targets.png)"
              + (" ![profiles](profiles.png)" if circles else ""), "", f"Host: {host_line(host)}."]
    return lines


if __name__ == "__main__":
    main()
