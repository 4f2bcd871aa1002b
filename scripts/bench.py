"""Benchmark: ms per DDPM training step and per guided sampling step, fp32 / AMP / channels_last / compile.

  python -m scripts.bench                       # CPU preset (its batch, 32) and the paper's 121M U-Net (batch 2)
  python -m scripts.bench --device cuda --paper-batch 64 --skip-cpu-preset --modes fp32,amp,bf16,amp+channels_last
  python -m scripts.bench --device cuda --paper-batch 64 --skip-cpu-preset --profile --modes amp   # where the time goes

A training step is forward + backward + AdamW + EMA update of the U-Net on L_hybrid; a guided sampling
step is one U-Net forward plus one classifier forward+backward (multi-guidance, λ = 30, 30), exactly what
sample.py runs per respaced step. Timing: warm-up, then the median of --repeats runs, all modes and steps
round-robin so that the machine's drift hits every mode alike. GFLOP/s counts the
convolutions and matmuls with torch.utils.flop_counter (what the hardware must at least do), compared with
the machine's fp32 peak (cores × FLOP/cycle × clock: 32 FLOP/cycle with AVX2+FMA, 64 with AVX-512), or on CUDA
with the fp16 matrix-product rate measured first (8192³ products). Modes join parts with "+" (`mode_parts`).
"compile" wraps the U-Net and classifier in torch.compile (its one-off compile time is printed). Attention goes
through torch's scaled_dot_product_attention (fused kernels); "sdpa_math" forces its unfused reference backend. Peak memory: CUDA's
max allocated after the mode's first steps, or on CPU the process's maximum resident set so far (monotone
across rows).
"""
import contextlib
import copy
import math
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from classifier import ClassifierConfig
from cli import ArgumentParser, InputError, one_line_errors
from ddpm import DiffusionConfig
from guidance import multi_guidance
from infra.checkpoint import build_classifier, write_json
from config import build_config, parse_args as train_args
from infra.device import autocast, resolve_device
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


MODE_PARTS = ("fp32", "amp", "bf16", "channels_last", "compile", "sdpa_math")


def mode_parts(mode):
    """The switches of a mode such as "amp+channels_last+compile"; raises InputError on an unknown part.

    fp32: no autocast; amp: the project's autocast (fp16 + GradScaler on CUDA, bf16 on CPU); bf16: bf16 autocast
    on any device; channels_last: NHWC memory format; compile: torch.compile of the U-Net, EMA and classifier;
    sdpa_math: attention through SDPA's unfused math backend (the baseline the fused kernels are measured against).
    """
    parts = set(mode.split("+"))
    if not parts <= set(MODE_PARTS) or {"amp", "bf16"} <= parts:
        raise InputError(f"--modes: {mode!r} is not a mode; join parts of {', '.join(MODE_PARTS)} with '+' "
                         f"(at most one of amp, bf16)")
    return parts


def mode_autocast(device, parts):
    if "bf16" in parts:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return autocast(device, "amp" in parts)


def mode_steps(mode, unet_config, make_classifier, batch, diffusion, sampler, device):
    """(train_step, guided_step, unguided_step, model) for one mode, each a closure over its own models."""
    parts = mode_parts(mode)
    amp, channels_last, compiled = "amp" in parts, "channels_last" in parts, "compile" in parts
    attention = (lambda: sdpa_kernel(SDPBackend.MATH)) if "sdpa_math" in parts else contextlib.nullcontext
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
        with mode_autocast(device, parts), attention():
            loss = diffusion.training_losses(train_model, x, t)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        ema_update(ema_params, params, 0.9999)

    cond_fn = multi_guidance([clf_net], [[30.0, 30.0]])
    ts = torch.full((batch,), 32, dtype=torch.long, device=device)

    def net(xx, tt):
        with mode_autocast(device, parts):
            return ema_net(xx, tt)

    def sample_step(guided=True):
        with torch.no_grad(), attention():
            sampler.p_sample(net, x, ts, cond_fn=cond_fn if guided else None)

    if compiled:
        t0 = time.perf_counter()
        train_step(), sample_step(), sample_step(False)
        print(f"  compile: {time.perf_counter() - t0:.0f} s of one-off compilation", flush=True)
    return train_step, sample_step, lambda: sample_step(False), model


def matmul_tflops(device, dtype, n=8192, repeats=10):
    """Measured dense matrix-product rate of the device (TFLOP/s, median of `repeats` n×n×n products on random
    data after warm-up): the practical ceiling the CUDA rows' GFLOP/s are compared with."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    secs = timed({"mm": lambda: a @ b}, repeats, device, warmup_s=1.0)["mm"]
    return 2 * n ** 3 / secs / 1e12


def bench_config(name, unet_config, make_classifier, batch, modes, repeats, device, warmup_s=3.0, peak=None):
    """One row per mode; all modes' steps are timed round-robin (see `timed`). `peak` (GFLOP/s) is what the
    GFLOP/s column is compared with: default the CPU's estimated fp32 peak, none on CUDA."""
    if peak is None:
        peak = cpu_peak_gflops() if device.type == "cpu" else float("nan")
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
                         peak_gib=peaks[mode], peak=peak))
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| config | params | mode | batch | train ms/step | train img/s | train GFLOP/s (% of peak) "
          "| guided sample ms/step | unguided sample ms/step | guided / unguided | peak mem GiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


def share_of_peak(gflops, peak):
    """"(56%)" of `peak`: the CPU's estimated fp32 peak, or on CUDA the measured fp16 matrix-product rate."""
    return f"({100 * gflops / peak:.0f}%)" if math.isfinite(peak) else "(no peak)"


def format_row(r):
    return (f"| {r['config']} | {r['params']} | {r['mode']} | {r['batch']} | {r['train_ms']:.0f} | "
            f"{r['train_img_s']:.1f} | {r['gflops']:.1f} {share_of_peak(r['gflops'], r['peak'])} | "
            f"{r['guided_ms']:.0f} | {r['unguided_ms']:.0f} | {r['guided_ms'] / r['unguided_ms']:.2f} | "
            f"{r['peak_gib']:.2f} |")


CATEGORIES = (("convolution", ("conv",)), ("matmul", ("mm", "matmul", "linear")),
              ("attention", ("attention", "flash", "sdpa")), ("normalisation", ("norm",)),
              ("optimizer + EMA", ("foreach", "adam", "lerp")), ("copies and casts", ("copy", "_to_copy", "clone")))


def category(op_name):
    """The kind of work an aten operator does (first match in CATEGORIES), else "elementwise and other"."""
    name = op_name.removeprefix("aten::")
    for label, keys in CATEGORIES:
        if any(k in name for k in keys):
            return label
    return "elementwise and other"


def profile(unet_config, make_classifier, batch, device, mode="fp32", repeats=3):
    """Where the time goes, per step kind (training; guided sampling): wall ms per step, the device's busy time
    (sum of the aten operators' self time on the device: CUDA kernels, or CPU time on a CPU) and its split by
    kind of work, plus torch.profiler's operator table. Busy time well under wall time means the device waits
    for the host (kernel launches, Python)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    diffusion = DiffusionConfig().build()
    train, guided, _, _ = mode_steps(mode, unet_config, make_classifier, batch, diffusion, diffusion.respace(64),
                                     device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    out = {}
    for name, fn in (("training step", train), ("guided sampling step", guided)):
        fn(), fn()
        wall = timed({name: fn}, repeats, device, warmup_s=0.0)[name]
        with torch_profile(activities=activities) as prof:
            for _ in range(repeats):
                fn()
            if cuda:
                torch.cuda.synchronize()
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        split = {}
        for e in ops:
            split[category(e.key)] = split.get(category(e.key), 0.0) + getattr(e, attr) / 1e3 / repeats
        busy = sum(split.values())
        out[name] = dict(wall_ms=1e3 * wall, busy_ms=busy, split_ms=dict(sorted(split.items(), key=lambda kv: -kv[1])))
        print(f"## {name} ({mode}, batch {batch}, {device.type}): {1e3 * wall:.1f} ms wall, {busy:.1f} ms busy")
        for label, ms in out[name]["split_ms"].items():
            print(f"  {label:24s} {ms:8.2f} ms  {100 * ms / max(busy, 1e-9):5.1f}%")
        print(prof.key_averages().table(sort_by=attr, row_limit=12))
    return out


def main(argv=None):
    p = ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per timed step (and >= 3 calls)")
    p.add_argument("--cpu-batch", type=int, default=None, help="batch of the CPU-preset rows (default: the preset's)")
    p.add_argument("--paper-batch", type=int, default=2, help="batch of the paper-config rows")
    p.add_argument("--modes", default="fp32,amp,channels_last,compile",
                   help=f"comma-separated modes, each parts joined by '+': {', '.join(MODE_PARTS)} "
                        "(e.g. amp+channels_last+compile)")
    p.add_argument("--skip-paper", action="store_true", help="no paper-config rows")
    p.add_argument("--skip-cpu-preset", action="store_true", help="no CPU-preset rows")
    p.add_argument("--profile", action="store_true",
                   help="where the time goes (first mode of --modes): the CPU preset's steps, or with "
                        "--skip-cpu-preset the paper config's")
    p.add_argument("--json", default=None, help="also write the rows (or the profile) to this JSON file")
    args = p.parse_args(argv)
    with one_line_errors("python -m scripts.bench"):
        device = resolve_device(args.device)
        modes = args.modes.split(",")
        for mode in modes:
            mode_parts(mode)
        for flag, value in (("--repeats", args.repeats), ("--cpu-batch", args.cpu_batch),
                            ("--paper-batch", args.paper_batch)):
            if value is not None and value < 1:
                raise InputError(f"{flag} must be a positive integer, got {value}")
        if args.skip_paper and args.skip_cpu_preset:
            raise InputError("--skip-paper and --skip-cpu-preset leave nothing to measure: drop one")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise InputError(f"--json {args.json}: its folder does not exist; create it first")
        run_bench(args, device, modes)


def run_bench(args, device, modes):
    peak = None
    if device.type == "cuda":
        peak = 1e3 * matmul_tflops(device, torch.float16)
        where = (f"device {torch.cuda.get_device_name(device)}, measured fp16 matmul {peak / 1e3:.0f} TFLOP/s "
                 f"(cuDNN/cuBLAS defaults: fp32 convolutions may use TF32)")
    else:
        where = (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
                 f"est. fp32 peak {cpu_peak_gflops():.0f} GFLOP/s")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {where}")
    demo = build_config(train_args(["--data", "circles"]))      # the demo's models, exactly as train.py builds them
    cpu_unet, cpu_clf = UNetConfig(**demo["unet"]), lambda: build_classifier(demo)
    cpu_batch = demo["train"]["batch_size"] if args.cpu_batch is None else args.cpu_batch
    configs = ([] if args.skip_cpu_preset else [("cpu preset 32px", cpu_unet, cpu_clf, cpu_batch, args.repeats)]) + \
              ([] if args.skip_paper else [("paper 64px", UNetConfig(), lambda: ClassifierConfig().build(),
                                            args.paper_batch, max(2, args.repeats // 2))])
    if args.profile:
        _, unet_config, make_classifier, batch, repeats = configs[0]
        result = dict(where=where, mode=modes[0], batch=batch,
                      steps=profile(unet_config, make_classifier, batch, device, modes[0], repeats=min(repeats, 3)))
    else:
        print(HEADER)
        rows = [row for name, unet_config, make_classifier, batch, repeats in configs
                for row in bench_config(name, unet_config, make_classifier, batch, modes, repeats, device,
                                        args.warmup, peak)]
        result = dict(where=where, rows=rows)
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
