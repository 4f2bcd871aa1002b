"""Why do guided circles break? Four probes of a trained circles run (RESULTS.md, session 3).

  python diagnose.py --run runs/circles                        # writes <run>/diagnose.md and diagnose.json

1. Classifier across the gap: p(right | one circle at x, t) for every centre x, averaged over y and noise,
   at several t. Multi-guidance (eq. 2) drives p towards 1/2; where p sits at 1/2 decides where circles go.
2. DDPM prior: images with two circles (one per border) or one circle in the unseen middle are noised to t
   (q_sample, eq. 4) and denoised without guidance by the run's sampler. A prior that forbids two circles
   removes one; a prior that generalises keeps the middle circle.
3. Guided trajectories: with multi-guidance (--lambdas), the number of blobs in x̂_0 along the chain: when do
   second circles appear, and do they go away?
4. The mean of ε̂: per image and channel, the spatial mean of ε̂ - ε at large t, and the error it causes in
   x̂_0 (δ·sqrt(1-ᾱ)/sqrt(ᾱ)); large values give random background levels.
5. Classifier on dim discs: p(right | one disc at the left border, intensity a) per t. A classifier trained on
   white discs only may read a dim left disc as "in between" (p near 1/2): then multi-guidance can reach
   p = 1/2 by dimming the disc below the detector's threshold instead of moving it (the "no circle" samples).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import checkpoint as ckpt_io
from data import circles_dataset, render_circles, to_float, to_uint8
from evaluate import detect_circles
from guidance import above_timestep, multi_guidance, parse_lambdas
from sample import guide_t_min_default, sampling_chain


def blob_counts(found):
    """Numbers of samples with 0 / 1 / 2 / 3+ circles (blobs), from evaluate.detect_circles output."""
    return np.bincount(np.minimum([f[0] for f in found], 3), minlength=4).tolist()


def p_right(clf, diffusion, x0, t, gen, repeats):
    """p(right | x_t, t) per image, averaged over `repeats` noise draws x_t = q_sample(x0, t)."""
    tt = torch.full((len(x0),), t, dtype=torch.long)
    with torch.no_grad():
        return np.mean([clf(diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=gen)), tt).softmax(-1)[:, 1]
                        .numpy() for _ in range(repeats)], axis=0)


def classifier_profile(clf, diffusion, image_size, radius, ts, repeats=4, seed=0):
    """{t: [p(right) per centre x]} over the full-range circles; x = the centres (pixels)."""
    images, _, pos = circles_dataset(image_size, radius, full_range=True)
    x0 = to_float(images)
    xs = np.unique(pos[:, 0])
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in ts:
        p = p_right(clf, diffusion, x0, t, gen, repeats)
        out[t] = [float(p[pos[:, 0] == x].mean()) for x in xs]
    return xs, out


def prior_probe(model, sampler, image_size, radius, starts, n=32, seed=0):
    """[{image, t, counts of 0/1/2/3+ circles, mean x of single circles}] after unguided denoising from t."""
    y, left, right, mid = image_size // 2, 2 * radius, image_size - 1 - 2 * radius, image_size // 2
    pictures = {"two circles (left + right border)": np.maximum(render_circles(np.array([[left, y]] * n), image_size, radius),
                                                                render_circles(np.array([[right, y]] * n), image_size, radius)),
                "one circle in the middle": render_circles(np.array([[mid, y]] * n), image_size, radius)}
    rows = []
    for name, images in pictures.items():
        for k in starts:
            gen = torch.Generator().manual_seed(seed)
            t = int(sampler.timestep_map[k])      # the respaced chain keeps ᾱ at its kept steps: index k is t
            x0 = to_float(images)
            x = sampler.q_sample(x0, torch.full((n,), k), torch.randn(x0.shape, generator=gen))
            for i in reversed(range(k)):
                with torch.no_grad():
                    x = sampler.p_sample(model, x, torch.full((n,), i), noise=torch.randn(x.shape, generator=gen))["sample"]
            found = detect_circles(to_uint8(x))
            xs = [c[0, 0] / image_size for m, c, _ in found if m == 1]
            rows.append(dict(image=name, t=t, counts=blob_counts(found), single_x_mean=float(np.mean(xs)) if xs else None))
    return rows


def guided_trajectory(model, sampler, clf, lambdas, image_size, n=32, seed=1, every=4, t_min=0):
    """[{t, counts of 0/1/2/3+ blobs in x̂_0}] along one multi-guided ancestral chain of n samples, guided at
    t >= t_min as sample.py does with the run's setting."""
    cond_fn = above_timestep(multi_guidance([clf], [lambdas]), t_min)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, image_size, image_size, generator=gen)
    rows = []
    for i in reversed(range(len(sampler.timestep_map))):
        with torch.no_grad():
            out = sampler.p_sample(model, x, torch.full((n,), i), cond_fn=cond_fn,
                                   noise=torch.randn(x.shape, generator=gen))
        x = out["sample"]
        if i % every == 0:
            rows.append(dict(t=int(sampler.timestep_map[i]), counts=blob_counts(detect_circles(to_uint8(out["pred_x0"] if i else x)))))
    return rows


def mean_error(model, diffusion, image_size, radius, ts, n=128, seed=0):
    """[{t, std of the per-image-and-channel mean of ε̂ - ε, the x̂_0 error it implies, ε MSE}]."""
    images, _, _ = circles_dataset(image_size, radius)
    x0 = to_float(images[:n])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in ts:
        noise, tt = torch.randn(x0.shape, generator=gen), torch.full((len(x0),), t)
        with torch.no_grad():
            eps = model(diffusion.q_sample(x0, tt, noise), tt)[:, :x0.shape[1]]
        err = (eps - noise).mean((2, 3)).std().item()
        ab = float(diffusion.alphas_cumprod[t])
        rows.append(dict(t=t, eps_mean_error_std=err, x0_error_std=err * ((1 - ab) / ab) ** 0.5,
                         eps_mse=float(((eps - noise) ** 2).mean())))
    return rows


def dim_profile(clf, diffusion, image_size, radius, ts, levels=(1.0, 0.7, 0.5, 0.3, 0.15), repeats=4, seed=0):
    """{t: [p(right) per intensity level]} for one disc at the left border (x = 2·radius), averaged over y, noise."""
    ys = np.arange(radius, image_size - radius)
    white = to_float(render_circles(np.array([[2 * radius, y] for y in ys]), image_size, radius))
    gen = torch.Generator().manual_seed(seed)
    out = {t: [float(p_right(clf, diffusion, a * (white + 1) - 1, t, gen, repeats).mean()) for a in levels] for t in ts}
    return list(levels), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/circles", help="circles run folder with ddpm.pt and a classifier")
    p.add_argument("--classifier", default="classifier", help="classifier name in the run or a .pt path")
    p.add_argument("--lambdas", default="30,30", help="multi-guidance weights of the trajectory probe")
    p.add_argument("--samples", type=int, default=32, help="images per prior / trajectory probe")
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        model, diffusion, config = ckpt_io.load_ddpm(run / "ddpm.pt")
        if config["data"]["name"] != "circles":
            raise ValueError(f"{run} is a {config['data']['name']} run; diagnose.py probes circles runs")
        path = Path(args.classifier) if args.classifier.endswith(".pt") else run / f"{args.classifier}.pt"
        clf, ccfg = ckpt_io.load_classifier(path)
        lambdas = parse_lambdas(args.lambdas, ccfg["classifier"]["num_classes"])
    except (ckpt_io.CheckpointError, ValueError) as e:
        print(f"diagnose.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    size, radius, T = config["data"]["image_size"], config["data"]["radius"], diffusion.num_steps
    sampler = sampling_chain(diffusion, config).respace(config["sample_steps"])
    K = len(sampler.timestep_map)
    ts = [0, T // 4, T // 2, 3 * T // 4, int(0.9 * T)]
    xs, profile = classifier_profile(clf, diffusion, size, radius, ts)
    prior = prior_probe(model, sampler, size, radius, sorted({3 * K // 4, K // 2, K // 4}, reverse=True), args.samples)
    t_min = guide_t_min_default(config)
    trajectory = guided_trajectory(model, sampler, clf, lambdas, size, args.samples, t_min=t_min)
    dc = mean_error(model, diffusion, size, radius, [int(0.99 * T), int(0.95 * T), int(0.75 * T), T // 2])
    levels, dim = dim_profile(clf, diffusion, size, radius, ts)
    report = dict(run=str(run), classifier=str(path), centres_x=xs.tolist(), classifier_p_right=profile,
                  prior=prior, trajectory=dict(lambdas=lambdas, rows=trajectory), eps_mean=dc,
                  dim_disc=dict(levels=levels, p_right=dim))
    (run / "diagnose.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Diagnosis of {run}", "", "## 1. Classifier p(right) vs circle centre x / W (averaged over y, noise)", "",
             "| t | " + " | ".join(f"{x / size:.2f}" for x in xs) + " |", "|---" * (len(xs) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for t, row in profile.items()]
    lines += ["", "## 2. DDPM prior: noised to t, denoised without guidance", "",
              "| image | t | 0 / 1 / 2 / 3+ circles | mean x / W of single circles |", "|---|---|---|---|"]
    lines += [f"| {r['image']} | {r['t']} | {' / '.join(map(str, r['counts']))} | "
              f"{'' if r['single_x_mean'] is None else format(r['single_x_mean'], '.2f')} |" for r in prior]
    lines += ["", f"## 3. Blobs in x̂_0 along a guided chain (λ = {args.lambdas}"
              f"{f', guided at t >= {t_min}' if t_min else ''}; the last row: the samples)", "",
              "| t | 0 / 1 / 2 / 3+ blobs |", "|---|---|"]
    lines += [f"| {r['t']} | {' / '.join(map(str, r['counts']))} |" for r in trajectory]
    lines += ["", "## 4. Mean of ε̂ - ε per image and channel", "",
              "| t | std of the mean error | implied x̂_0 error | ε MSE |", "|---|---|---|---|"]
    lines += [f"| {r['t']} | {r['eps_mean_error_std']:.4f} | {r['x0_error_std']:.3f} | {r['eps_mse']:.4f} |" for r in dc]
    lines += ["", "## 5. Classifier p(right) for one disc at the left border, dimmed to intensity a", "",
              "| t | " + " | ".join(f"a = {a:g}" for a in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for t, row in dim.items()]
    (run / "diagnose.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return report


if __name__ == "__main__":
    main()
