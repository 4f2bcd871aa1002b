"""Benchmark: ms per DDPM training step and per guided sampling step, fp32 / AMP / channels_last / compile.

  python bench.py                       # CPU preset (its batch, 32) and the paper's 121M U-Net (batch 2)
  python bench.py --device cuda --paper-batch 64

A training step is forward + backward + AdamW + EMA update of the U-Net on L_hybrid; a guided sampling
step is one U-Net forward plus one classifier forward+backward (multi-guidance, λ = 30, 30), exactly what
sample.py runs per respaced step. Timing: warm-up, then the median of --repeats runs, all modes and steps
round-robin so that the machine's drift hits every mode alike. GFLOP/s counts the
convolutions and matmuls with torch.utils.flop_counter (what the hardware must at least do), compared with
the machine's fp32 peak (cores × FLOP/cycle × clock: 32 FLOP/cycle with AVX2+FMA, 64 with AVX-512). "compile"
wraps the U-Net and classifier in torch.compile (its one-off compile time is printed). Peak memory: CUDA's
max allocated after the mode's first steps, or on CPU the process's maximum resident set so far (monotone
across rows).
"""
import argparse
import copy
import math
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from classifier import ClassifierConfig
from ddpm import DiffusionConfig
from guidance import multi_guidance
from checkpoint import build_classifier
from config import build_config, parse_args as train_args
from device import autocast
from train import ema_update
from unet import UNetConfig, count_parameters


def timed(fns, repeats, device, warmup_s=3.0):
    """Median seconds per call of each function in `fns` (name -> fn), timed round-robin.

    Each function is first warmed up (>= 3 calls and >= warmup_s seconds: allocator growth, kernel selection),
    then the repeats interleave the functions, so that a drift of the machine's speed (this 2-core VM varies by
    ±20% within minutes) hits every mode alike instead of favouring whichever ran last.
    """
    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():
        t0, calls = time.perf_counter(), 0
        while calls < 3 or time.perf_counter() - t0 < warmup_s:
            fn()
            calls += 1
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def cpu_peak_gflops():
    """Estimated fp32 peak of the cores torch uses: threads × FLOP/cycle × clock (from /proc/cpuinfo)."""
    try:
        info = open("/proc/cpuinfo").read()
        mhz = max(float(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu MHz"))
    except (OSError, ValueError):
        return float("nan")
    per_cycle = 64 if "avx512f" in info else 32 if "fma" in info else 16
    return torch.get_num_threads() * per_cycle * mhz / 1e3


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20      # kB -> GiB


def mode_steps(mode, unet_config, make_classifier, batch, diffusion, sampler, device):
    """(train_step, guided_step, unguided_step, model) for one mode, each a closure over its own models."""
    amp, channels_last, compiled = mode == "amp", mode == "channels_last", mode == "compile"
    torch.manual_seed(0)
    model = unet_config.build().to(device)
    clf = make_classifier().to(device).eval()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, ema = model.to(memory_format=fmt), ema.to(memory_format=fmt)
    x = torch.randn(batch, unet_config.in_channels, unet_config.image_size, unet_config.image_size,
                    device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    params, ema_params = list(model.parameters()), list(ema.parameters())
    train_model, ema_net, clf_net = model, ema, clf
    if compiled:
        train_model, ema_net, clf_net = torch.compile(model), torch.compile(ema), torch.compile(clf)

    def train_step():
        with autocast(device, amp):
            loss = diffusion.training_losses(train_model, x, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ema_update(ema_params, params, 0.9999)

    cond_fn = multi_guidance([clf_net], [[30.0, 30.0]])
    ts = torch.full((batch,), 32, dtype=torch.long, device=device)

    def net(xx, tt):
        with autocast(device, amp):
            return ema_net(xx, tt)

    def sample_step(guided=True):
        with torch.no_grad():
            sampler.p_sample(net, x, ts, cond_fn=cond_fn if guided else None)

    if compiled:
        t0 = time.perf_counter()
        train_step(), sample_step(), sample_step(False)
        print(f"  compile: {time.perf_counter() - t0:.0f} s of one-off compilation", flush=True)
    return train_step, sample_step, lambda: sample_step(False), model


def bench_config(name, unet_config, make_classifier, batch, modes, repeats, device, warmup_s=3.0):
    """One row per mode; all modes' steps are timed round-robin (see `timed`)."""
    diffusion = DiffusionConfig().build()
    sampler = diffusion.respace(64)
    steps, models, peaks = {}, {}, {}
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train, guided, unguided, models[mode] = mode_steps(mode, unet_config, make_classifier, batch, diffusion, sampler, device)
        steps.update({(mode, "train"): train, (mode, "guided"): guided, (mode, "unguided"): unguided})
        train(), guided(), unguided()
        peaks[mode] = peak_memory_gib(device)
    print(f"  timing {len(steps)} steps round-robin, {repeats} repeats ...", flush=True)
    secs = timed(steps, repeats, device, warmup_s)
    rows = []
    for mode in modes:
        model = models[mode]
        x = torch.randn(batch, unet_config.in_channels, unet_config.image_size, unet_config.image_size, device=device)
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        flops = count_flops(lambda: diffusion.training_losses(model, x, t)["loss"].mean().backward())  # eager:
        model.zero_grad(set_to_none=True)                                   # the same work in every mode
        train_s = secs[mode, "train"]
        rows.append(dict(config=name, params=f"{count_parameters(model) / 1e6:.2f}M", mode=mode, batch=batch,
                         train_ms=1e3 * train_s, train_img_s=batch / train_s, gflops=flops / train_s / 1e9,
                         guided_ms=1e3 * secs[mode, "guided"], unguided_ms=1e3 * secs[mode, "unguided"],
                         peak_gib=peaks[mode], peak=cpu_peak_gflops() if device.type == "cpu" else float("nan")))
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| config | params | mode | batch | train ms/step | train img/s | train GFLOP/s (% of peak) "
          "| guided sample ms/step | unguided sample ms/step | guided / unguided | peak mem GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def share_of_peak(gflops, peak):
    """"(56%)" of the CPU's estimated fp32 peak; "(GPU)" where no peak is estimated (CUDA rows)."""
    return f"({100 * gflops / peak:.0f}%)" if math.isfinite(peak) else "(GPU)"


def format_row(r):
    return (f"| {r['config']} | {r['params']} | {r['mode']} | {r['batch']} | {r['train_ms']:.0f} | "
            f"{r['train_img_s']:.1f} | {r['gflops']:.1f} {share_of_peak(r['gflops'], r['peak'])} | "
            f"{r['guided_ms']:.0f} | {r['unguided_ms']:.0f} | {r['guided_ms'] / r['unguided_ms']:.2f} | "
            f"{r['peak_gib']:.2f} |")


def profile(unet_config, make_classifier, batch):
    """Where the time goes: self CPU time per operator over 3 training steps and 3 guided sampling steps."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    diffusion = DiffusionConfig().build()
    model, clf = unet_config.build(), make_classifier().eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(batch, 3, unet_config.image_size, unet_config.image_size), torch.randint(0, 4000, (batch,))
    cond_fn = multi_guidance([clf], [[30.0, 30.0]])
    sampler = diffusion.respace(64)
    steps = {
        "training step": lambda: (opt.zero_grad(), diffusion.training_losses(model, x, t)["loss"].mean().backward(),
                                  opt.step()),
        "guided sampling step": lambda: sampler.p_sample(model, x, torch.full((batch,), 32), cond_fn=cond_fn),
    }
    for name, fn in steps.items():
        fn()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn()
        print(f"## {name} (3 repeats, batch {batch})")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-batch", type=int, default=None, help="batch of the CPU-preset rows (default: the preset's)")
    p.add_argument("--paper-batch", type=int, default=2, help="batch of the paper-config rows")
    p.add_argument("--modes", default="fp32,amp,channels_last,compile",
                   help="comma-separated: fp32, amp, channels_last, compile")
    p.add_argument("--skip-paper", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler table of one CPU-preset training step and one guided sampling step")
    args = p.parse_args()
    device = torch.device(args.device)
    modes = args.modes.split(",")
    where = (f"device {torch.cuda.get_device_name(device)} (cuDNN/cuBLAS defaults: fp32 convolutions may use TF32)"
             if device.type == "cuda" else f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                                            f"est. fp32 peak {cpu_peak_gflops():.0f} GFLOP/s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    demo = build_config(train_args(["--data", "circles"]))      # the demo's models, exactly as train.py builds them
    cpu_unet, cpu_clf = UNetConfig(**demo["unet"]), lambda: build_classifier(demo)
    cpu_batch = args.cpu_batch or demo["train"]["batch_size"]
    if args.profile:
        return profile(cpu_unet, cpu_clf, cpu_batch)
    print(HEADER)
    bench_config("cpu preset 32px", cpu_unet, cpu_clf, cpu_batch, modes, args.repeats, device)
    if not args.skip_paper:
        bench_config("paper 64px", UNetConfig(), lambda: ClassifierConfig().build(), args.paper_batch, modes,
                     max(2, args.repeats // 2), device)


if __name__ == "__main__":
    main()
