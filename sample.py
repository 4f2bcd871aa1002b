"""Sample a trained run, unguided or with (multi-)classifier guidance, and evaluate the samples.

  python sample.py --lambdas 30,30                  # multi-guidance [ZSI eq. 2] with runs/circles/classifier.pt
  python sample.py --lambdas 0,30                   # regular classifier guidance towards class 1
  python sample.py                                  # unguided
  python sample.py --classifier classifier --lambdas 30,30 --classifier classifier_sn --lambdas 10,10
  python sample.py --classifier classifier_sn --target 0.35    # discs at x/W = 0.35 of the gap (beyond/target.py)

Everything is rebuilt from the run folder (config and checkpoints). Writes a new folder
<run>/samples/<tag>/ (never overwriting one, unless --overwrite; filled under a temporary name and renamed when
complete, so a failed run leaves nothing behind) with samples.npz (key `arr_0`: uint8 N×H×W×C, guided-diffusion's
layout, plus `lambdas`, `seed`, `classifiers`), grid.png, report.json/report.md (with the host, AMP mode and torch
version), for circles the histogram of circle centres (training data vs unguided vs guided) and the classifier
heatmaps (Fig. 7b), for MNIST the stroke-thickness histogram and digit quality (beyond/mnist_eval.py).

  torchrun --nproc_per_node 4 sample.py --run-dir runs/circles --lambdas 30,30   # 4 processes/GPUs, same samples
"""
import json
import time

import torch

from data import save_grid
from evaluate import circles_sample_report, save_samples, sizes_sample_report, write_report
from guidance import multi_guidance
from sample_flags import check, load_classifiers, load_run, parse_args, sample_label
from appendix import inversion
from appendix.evaluator import attribute_report
from appendix.extrapolation import green_report, quadrant_report
from appendix.quality import run_quality_report
from beyond import target as target_io
from beyond.cpu_preset import Additions
from beyond.mnist_eval import thickness_report
from cli import one_line_errors
from infra import checkpoint as ckpt_io
from infra.device import amp_default, resolve_device, setup_distributed
from infra.generate import default_batch_size, generate, sampling_model


@one_line_errors("sample.py")        # also what fails after the checks: samples that are not finite (SamplingError)
def main(argv=None):
    args = parse_args(argv)
    with one_line_errors("sample.py"):
        rank, world, device = setup_distributed(resolve_device(args.device))
        args.amp = amp_default(device) if args.amp is None else args.amp
        args.batch_size = default_batch_size(device) if args.batch_size is None else args.batch_size
        # 1. The run: the trained denoiser ε_θ(x_t, t) (EMA weights), its chain of T steps and its config
        run, model, diffusion, config = load_run(args, device)
        # 2. The guidance classifiers p_k(y | x_t, t) [ZSI Sec. 4.2] and their weights λ_km, one per class m
        named_paths, classifiers, classifier_configs, lambdas = load_classifiers(args, run, config, device)
        todo = check(args, run, config, diffusion, named_paths, classifiers, lambdas, device, world)  # every flag
        # 3. The CPU preset's additions, all of them here (not in the paper; none with --preset paper)
        additions = Additions.of_run(config, classifier_configs, args.dc_correction,
                                     args.guide_t_min if todo.guiding else 0)
    print(f"[sample] the CPU preset's additions: {additions}", flush=True)
    classifiers = additions.classifiers(classifiers)                     # mirror-equivariant heads

    # 4. Multi-guidance [ZSI eq. 2]: cond_fn(x_t, t) = ∇_{x_t} Σ_k Σ_m λ_km log p_k(y_m | x_t, t)
    cond_fn = multi_guidance(classifiers, lambdas) if classifiers and args.target is None else None
    chain, loop, aim = diffusion.respace(args.sample_steps), None, None    # respaced chain [IDDPM sec. 4]
    if args.target is not None:     # beyond the paper: sampling at a chosen level of the gap (beyond/target.py)
        cond_fn, loop, aim = target_io.target_sampler(args, classifiers[0], diffusion, chain, config["data"], device)
    cond_fn = additions.cond_fn(cond_fn)                                 # guidance window
    net = sampling_model(model, device, args.amp, args.channels_last, todo.cfg)   # autocast; CFG [ZSI eq. 12]
    net = additions.denoiser(net, chain)                                 # DC correction
    if args.interpolate or args.edit:                                    # App. M, N: DDIM inversion
        with ckpt_io.staged_output(todo.out) as tmp:
            inversion.run_inversion(args, todo.real, net, chain, cond_fn, config, run, tmp, device)
        print(f"done: {todo.out}", flush=True)
        return todo.out

    # 5. Sample: ancestral [DDPM Alg. 2] with the guided mean μ + Σ g [ADM Alg. 1], or DDIM [DDIM eq. 12]
    print(f"[sample] {todo.n} samples, {args.sample_steps} {'DDIM' if args.ddim else 'ancestral'} steps, guidance "
          f"{todo.tag}, device {device} -> {todo.out}", flush=True)
    t0 = time.perf_counter()
    samples = generate(net, chain, (model.in_channels, model.image_size, model.image_size), todo.n, args.batch_size,
                       device, args.seed, cond_fn=cond_fn, ddim=args.ddim, eta=args.eta, guide_at=args.guide_at,
                       loop=loop, verbose=True, shard=(rank, world))
    seconds = time.perf_counter() - t0
    if world > 1:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return todo.out

    # 6. Save and report
    save_and_report(args, run, config, samples, named_paths, classifiers, lambdas, aim, todo, additions, seconds,
                    device)
    print(f"done: {todo.out}", flush=True)
    return todo.out


def save_and_report(args, run, config, samples, named_paths, classifiers, lambdas, aim, todo, additions, seconds,
                    device):
    """samples.npz, grid.png and report.json/md in todo.out (written into a temporary folder, renamed when
    complete), with the data set's measures: circles (position histogram, heatmaps), sizes, MNIST thickness, the
    target level, CelebA attributes, quality."""
    out, tag, n, dc, t_min = todo.out, todo.tag, todo.n, additions.dc_prior is not None, args.guide_t_min
    with ckpt_io.staged_output(out) as tmp:     # written into a temporary folder, renamed when complete
        save_samples(tmp / "samples.npz", samples, lambdas=json.dumps(lambdas), seed=args.seed,
                     batch_size=args.batch_size, classifiers=json.dumps([str(p) for _, p in named_paths]))
        save_grid(samples[:100], tmp / "grid.png", nrow=10, scale=max(1, 128 // samples.shape[1]))
        report = dict(run=str(run), guidance=tag, lambdas=json.dumps(lambdas), steps=args.sample_steps,
                      sampler="ddim" if args.ddim else "ancestral", dc_correction=dc, guide_at=args.guide_at,
                      guide_t_min=t_min if classifiers else None, num_samples=n, seed=args.seed,
                      batch_size=args.batch_size, additions=str(additions), seconds=seconds)
        label = target_io.label(args) or sample_label(lambdas, args.cfg_scale)
        if todo.circles:
            report.update(circles_sample_report(samples, label, config["data"], run, tmp, named_paths, device,
                                                args.heatmaps, seconds))
        if config["data"]["name"] == "sizes":
            report.update(sizes_sample_report(samples, config["data"], tag, tmp))
        if config["data"]["name"] == "quadrant":                # Sec. 7: where the discs land
            report.update(quadrant_report(samples, config["data"], label, tmp))
        if config["data"]["name"] == "green":                   # App. E: the discs' colour
            report.update(green_report(samples, label, tmp))
        if todo.digits:
            report.update(thickness_report(samples, config["data"], run, tmp, label, device, args.seed))
        if args.target is not None:
            report.update(target_io.target_report(samples, aim, config["data"], tmp, label))
        if todo.evaluators:
            label = "unguided" if not classifiers and args.cfg_scale is None else tag
            report.update(attribute_report(samples, todo.evaluators, config["data"], run, tmp, label, device))
        if args.quality:
            report.update(run_quality_report(samples, config["data"], named_paths[0][1] if named_paths
                                             else run / "classifier.pt", tmp, device, **todo.quality))
        write_report(report, tmp, f"Samples of {run}: {tag}", device=device, amp=args.amp)


if __name__ == "__main__":
    main()
