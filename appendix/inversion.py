"""DDIM inversion and what it enables: latent interpolation (App. M) and attribute editing (App. N).

[ZSI] App. M: invert two real images deterministically (DDIM, η = 0) to a noise level t_stop (half of T in
the paper), interpolate the two latents with slerp (spherical; lerp for comparison), decode with DDIM η = 0.
App. N: invert an image to t_start, then denoise with classifier guidance using DDIM with a per-step
η_t = t / t_start (deterministic near the data, stochastic near the latent), which keeps the image's layout
while the guidance changes the attribute. Both run on a respaced chain; indices are respaced steps.
`sample.py --interpolate` / `--edit` call `run_inversion`, which also measures circle positions on circles.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli import InputError, check_unused, parse_lambdas
from data import circles_dataset, load_images, save_grid, to_float, to_uint8
from evaluate import circle_metrics, detect_circles, plot_histograms, save_samples, write_report


def slerp(z0, z1, alpha):
    """Spherical interpolation of two latents per example: sin((1-α)θ)/sin θ · z0 + sin(αθ)/sin θ · z1."""
    a, b = z0.flatten(1), z1.flatten(1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]
    sin = torch.sin(theta)
    lerp_w = torch.tensor([[1 - alpha, alpha]], dtype=a.dtype, device=a.device)
    w0 = torch.where(sin > 1e-6, torch.sin((1 - alpha) * theta) / sin, lerp_w[:, :1])
    w1 = torch.where(sin > 1e-6, torch.sin(alpha * theta) / sin, lerp_w[:, 1:])
    return (w0 * a + w1 * b).view_as(z0)


def lerp(z0, z1, alpha):
    return (1 - alpha) * z0 + alpha * z1


def inversion_index(t_fraction, num_timesteps):
    """The respaced index of the latent at `t_fraction` in (0, 1] of a K-step chain: round(t_fraction·(K-1)),
    at least 1.

    x_0 sits at index 0 and ddim_reverse_loop(t_stop) runs t_stop reverse steps, so the reachable latents are
    the indices 1..K-1 (original timesteps timestep_map[1..K-1]); t_fraction = 1 is index K-1, original
    t = T-1, the whole chain. A one-step chain has no latent to invert to.
    """
    if num_timesteps < 2:
        raise InputError(f"--interpolate / --edit invert to a respaced index in 1..steps-1, so they need --sample-steps "
                         f"2 or more; got {num_timesteps}")
    if not 0 < t_fraction <= 1:
        raise InputError(f"--t-fraction must be in (0, 1], got {t_fraction}")
    return min(num_timesteps - 1, max(1, round(t_fraction * (num_timesteps - 1))))


def _check_index(diffusion, t_stop):
    if not 1 <= t_stop <= diffusion.num_timesteps - 1:
        raise InputError(f"inversion index {t_stop} is outside 1..{diffusion.num_timesteps - 1}, the latents of a "
                         f"{diffusion.num_timesteps}-step chain")


def invert(diffusion, model, x0, t_stop):
    """Deterministic DDIM latent of real images x0 ([-1, 1]) at respaced index t_stop (1..K-1)."""
    _check_index(diffusion, t_stop)
    return diffusion.ddim_reverse_loop(model, x0, t_stop)


def decode(diffusion, model, z, t_stop, cond_fn=None, eta=0.0, generator=None):
    """DDIM from the latent z at respaced index t_stop (1..K-1) down to x_0."""
    _check_index(diffusion, t_stop)
    return diffusion.ddim_sample_loop(model, z.shape, noise=z, t_start=t_stop, eta=eta, cond_fn=cond_fn,
                                      generator=generator, device=z.device)


def interpolate(diffusion, model, x_a, x_b, t_stop, points=9):
    """{"slerp": [points, C, H, W], "lerp": ...} decoded along the path between the latents of x_a and x_b."""
    z = invert(diffusion, model, torch.stack([x_a, x_b]), t_stop)
    alphas = np.linspace(0, 1, points)
    out = {}
    for name, fn in (("slerp", slerp), ("lerp", lerp)):
        path = torch.cat([fn(z[:1], z[1:], float(a)) for a in alphas])
        out[name] = decode(diffusion, model, path, t_stop)
    return out, alphas


def edit(diffusion, model, x0, t_start, cond_fn, generator=None):
    """App. N: invert to t_start, then guided DDIM back to 0 with η_t = t / t_start."""
    z = invert(diffusion, model, x0, t_start)
    return decode(diffusion, model, z, t_start, cond_fn=cond_fn, eta=lambda i: i / t_start, generator=generator)


# ---------------------------------------------------------------------------------------------------
# sample.py --interpolate / --edit
# ---------------------------------------------------------------------------------------------------

def check_flags(args, data_config, classifiers, world):
    """sample.py's checks of the --interpolate / --edit flags (InputError), after its own (args.sample_steps set).
    Returns inversion_inputs' images, read now so that bad --images fail before any work, or None without a mode."""
    if not (args.interpolate or args.edit):
        check_unused(args, [("images t_fraction points", False, "it belongs to --interpolate / --edit; add one")])
        return None
    if world > 1 or args.interpolate and args.edit:
        raise InputError("--interpolate and --edit are separate runs in one process: pass one, without torchrun")
    unused = [flag for flag, on in (("--cfg-scale", args.cfg_scale is not None), ("--ddim", args.ddim),
                                    ("--eta", args.eta != 0), ("--quality", args.quality),
                                    ("--evaluator", bool(args.evaluator))) if on]
    if unused:
        raise InputError(f"--interpolate / --edit run their own DDIM schedule and report; drop {', '.join(unused)}")
    inversion_index(args.t_fraction, args.sample_steps)                 # a latent index in 1..steps-1 exists
    if args.points < 2:
        raise InputError(f"--points must be at least 2, got {args.points}")
    if args.edit and not classifiers:
        raise InputError("--edit needs guidance: pass --lambdas (e.g. 30,30) for the run's classifier")
    check_unused(args, [("points", args.interpolate, "it counts the images on the --interpolate path"),
                        ("lambdas classifier seed num_samples", args.edit, "--interpolate decodes the path of two "
                         "images unguided and deterministically (DDIM, η = 0)"),
                        ("num_samples", not args.images, "--edit edits the --images given"),
                        ("batch_size", False, "--interpolate / --edit decode all their images in one batch")])
    return inversion_inputs(args, data_config, args.num_samples or 64)


def inversion_inputs(args, data_config, n):
    """uint8 real images [N, H, W, C] to invert: --images files (C = 1 for a grayscale run), else circles from the
    training borders: a left and a right one for --interpolate; for --edit the first n of the classes that --lambdas
    leaves at 0 (App. N edits non-smiling faces with classifier guidance towards smiling: `--lambdas 0,30` edits
    left circles towards the right), or of all classes when every λ is non-zero. args: sample.py's flags.
    Raises InputError."""
    if args.images:
        paths = [Path(p) for p in args.images.split(",")]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise InputError(f"--images: {', '.join(missing)} not found")
        if args.interpolate and len(paths) != 2:
            raise InputError(f"--interpolate takes exactly two --images, got {len(paths)}")
        images = load_images(paths, data_config["image_size"])
        if data_config.get("channels", 3) == 1:      # a grayscale run: the files' luma (Rec. 601, as PIL's "L")
            images = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images])[..., None]
        return images
    if data_config["name"] != "circles":
        raise InputError("--interpolate / --edit need --images A.png,B.png for this run's data")
    d = data_config
    images, labels, _ = circles_dataset(d["image_size"], d["radius"], d["delta"], seed=d["seed"])
    if args.interpolate:
        return np.stack([images[labels == 0][0], images[labels == 1][0]])
    if args.lambdas and len(args.lambdas) == 1:     # one classifier's weights (several: every class)
        weights = parse_lambdas(args.lambdas[0])
        source = [k for k, w in enumerate(weights) if w == 0]
        if source and len(source) < len(weights):
            images = images[np.isin(labels, source)]
    return images[:min(n, len(images))]


def run_inversion(args, real, net, diffusion, cond_fn, config, run, out, device):
    """App. M interpolation strip or App. N edits of the uint8 images `real` (inversion_inputs) into `out`, with
    circle positions measured when the data is circles. net: the denoiser as the samplers call it (sample.py:
    generate.sampling_model and the run's additions); diffusion: the respaced chain."""
    t_stop = inversion_index(args.t_fraction, diffusion.num_timesteps)
    x = to_float(real).to(device)
    circles = config["data"]["name"] == "circles"
    report = dict(run=str(run), mode="interpolate" if args.interpolate else "edit", steps=diffusion.num_timesteps,
                  t_stop=t_stop, t_stop_original=int(diffusion.timestep_map[t_stop]), t_fraction=args.t_fraction,
                  seed=args.seed)
    scale = max(1, 128 // real.shape[1])
    if args.interpolate:
        paths, alphas = interpolate(diffusion, net, x[0], x[1], t_stop, args.points)
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
        edited = to_uint8(edit(diffusion, net, x, t_stop, cond_fn, generator=gen))
        save_grid(np.concatenate([real[:16], edited[:16]]), out / "edit.png", nrow=min(16, len(real)), scale=scale)
        save_samples(out / "samples.npz", edited, originals=real)
        if circles:
            before, after = detect_circles(real), detect_circles(edited)
            moved = [abs(a[1][0, 0] - b[1][0, 0]) >= 2 for b, a in zip(before, after) if a[0] == 1 and b[0] == 1]
            m = circle_metrics(edited)
            report.update(images=len(real), moved_2px_or_more=float(np.sum(moved) / len(real)),
                          edited_in_middle=m["accuracy"], originals_in_middle=circle_metrics(real)["accuracy"],
                          edited_zero_or_multi=m["invalid"])
            plot_histograms({"originals": circle_metrics(real)["x"], "edited": m["x"]}, out / "histogram_x.png",
                            "circle centre x / W (single-circle images)")
    write_report(report, out, f"DDIM {report['mode']} on {run}", device=device, amp=args.amp)
    print(f"[sample] {report['mode']}: " + ", ".join(f"{k} {v}" for k, v in report.items()
                                                   if k.endswith(("middle", "2px_or_more", "_x"))), flush=True)
    return out
