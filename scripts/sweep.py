"""Sweep the guidance strength λ (the same λ for every class of the guidance classifier), [ZSI] Sec. 5.3.

  python -m scripts.sweep --run runs/celeba_smile --lambdas 0,3.5,10,30,50,75,100        # Fig. S13: KLD / "MSE" vs λ
  python -m scripts.sweep --run runs/celeba_smile --lambdas 0,10,30,50 --quality          # Table S2: FID / P / R vs λ
  python -m scripts.sweep --run runs/circles --lambdas 0,10,30,100 --num-samples 256      # circles: accuracy vs λ
  python -m scripts.sweep --run runs/mnist --lambdas 0,10,30,100                          # digits: thickness band vs λ

For each λ it calls sample.py (λ = 0 is the unguided reference) and collects what that run's report holds:
on CelebA the evaluation classifier's histogram distances to uniform (paper-exact [min, max] bins and clean
[0, 1] bins), on circles the accuracy and the 0/2+-circle rate, on MNIST the share in the unseen thickness band and
the digit quality (beyond/mnist_eval.py), with --quality FID / precision / recall.
Writes <run>/sweeps/<name>/{sweep.md, sweep.json, sweep.png}; each λ's samples stay in <run>/samples/.
"""
import argparse
import json
import shlex
from pathlib import Path

from infra import checkpoint as ckpt_io
import sample
from cli import ArgumentParser, InputError, one_line_errors
from evaluate import _pyplot, host_line

# report keys worth a curve, by family; the KLD / L2 keys carry the sample label as a suffix (sample.py)
QUALITY = ("fid_", "precision_", "recall_")   # their keys carry the reference set's name (quality.quality_report)
FAMILIES = {
    "uniformity (evaluation classifier)": ("kld_paper", "mse_paper", "kld_01", "l2_01"),
    "circles": ("accuracy_middle", "zero_or_multi"),
    "MNIST thickness, digit quality": ("in_band_samples", "thinner_samples", "thicker_samples", "no_stroke_samples",
                                       "digit_confident_samples"),
    "MNIST FID to the held-out middle": ("fid_middle_samples",),
    "FID (log scale)": ("fid_pixels", "fid_classifier", "fid_inception"),
    "precision / recall": ("precision_pixels", "recall_pixels", "precision_classifier", "recall_classifier",
                           "precision_inception", "recall_inception"),
}


def parse_values(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--lambdas takes comma-separated numbers, e.g. 0,10,30; got {text!r}")
    if not values or any(v < 0 or v != v or v == float("inf") for v in values):
        raise InputError(f"--lambdas needs finite weights >= 0, e.g. 0,10,30; got {text!r}")
    return values


def row_of(report):
    """The sweep's numbers from one sample.py report (suffix-free names)."""
    label = report["guidance"]
    row = {}
    for keys in FAMILIES.values():
        for k in keys:
            v = report.get(f"{k}_{label}", report.get(k))
            if isinstance(v, (int, float)):
                row[k] = float(v)
            for key, v in report.items():      # per reference set (App. I: fid_inception_full, fid_inception_mild)
                if k.startswith(QUALITY) and key.startswith(f"{k}_") and isinstance(v, (int, float)):
                    row[key] = float(v)
    return row


def plot(rows, path):
    plt = _pyplot()
    lam = [r["lambda"] for r in rows]
    panels = [(title, [k for k in rows[0] if any(k == f or k.startswith(f"{f}_") for f in keys)
                       and all(k in r for r in rows)]) for title, keys in FAMILIES.items()]
    panels = [(t, ks) for t, ks in panels if ks]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot(lam, [r[k] for r in rows], "o-", label=k)
        if title.startswith("FID"):
            ax.set_yscale("log")
        ax.set_xlabel("λ (every class)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = ArgumentParser(prog="python -m scripts.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", default="runs/circles", help="run folder with ddpm.pt and the guidance classifier")
    p.add_argument("--lambdas", default="0,3.5,10,30,50,75,100", help="λ values (paper Fig. S13); 0 = unguided")
    p.add_argument("--classifier", default="classifier", help="guidance classifier name in the run or a .pt path")
    p.add_argument("--num-samples", type=int, default=None, help="per λ (default: sample.py's)")
    p.add_argument("--quality", action="store_true", help="also FID / precision / recall per λ (Table S2)")
    p.add_argument("--name", default=None, help="folder name under <run>/sweeps")
    p.add_argument("--sample-args", default="", help="extra sample.py flags, quoted, e.g. '--sample-steps 250 --seed 1'")
    args = p.parse_args(argv)
    run = Path(args.run)
    with one_line_errors("python -m scripts.sweep"):
        values = parse_values(args.lambdas)
        path = Path(args.classifier) if args.classifier.endswith(".pt") else run / f"{args.classifier}.pt"
        if not (run / "ddpm.pt").exists():
            raise InputError(f"{run}/ddpm.pt not found; train first or pass --run DIR")
        k = ckpt_io.load_classifier(path)[1]["classifier"]["num_classes"] if any(values) else 0
    name = args.name or f"lambdas_{'-'.join(f'{v:g}' for v in values)}"
    common = ["--run", str(run), *shlex.split(args.sample_args)]
    common += ["--num-samples", str(args.num_samples)] if args.num_samples else []
    common += ["--quality"] if args.quality else []
    rows, host = [], None
    for lam in values:
        guide = ["--classifier", args.classifier, "--lambdas", ",".join([f"{lam:g}"] * k)] if lam > 0 else []
        out = sample.main([*common, *guide, "--name", f"sweep_{name}_lambda{lam:g}", "--overwrite"])
        report = json.loads((out / "report.json").read_text())
        host = report.get("host")
        rows.append({"lambda": lam, **row_of(report), "seed": report.get("seed"), "folder": str(out)})
    folder = run / "sweeps" / name
    folder.mkdir(parents=True, exist_ok=True)
    plot(rows, folder / "sweep.png")
    (folder / "sweep.json").write_text(json.dumps(dict(rows=rows, host=host), indent=2) + "\n")
    keys = [k for k in rows[0] if k not in ("lambda", "seed", "folder")]
    lines = [f"# λ sweep of {run}", "", "| λ | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['lambda']:g} | " + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys) + " |"
              for r in rows]
    lines += ["", "kld/mse_paper: bins over the sample's [min, max] (the paper's code; its \"MSE\" is an L2 norm); "
              "kld_01/l2_01: bins on [0, 1]. ![sweep](sweep.png)", "",
              f"Host: {host_line(host)}; sampling seed {rows[0]['seed']}."]
    (folder / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"done: {folder}", flush=True)
    return folder


if __name__ == "__main__":
    main()
