"""Benchmark: ms per DDPM training step and per guided sampling step, fp32 vs AMP vs channels_last.

  python bench.py                       # CPU preset (batch 64) and the paper's 121M U-Net (batch 2)
  python bench.py --device cuda --paper-batch 64

A training step is forward + backward + AdamW + EMA update of the U-Net on L_hybrid; a guided sampling
step is one U-Net forward plus one classifier forward+backward (multi-guidance, λ = 30, 30), exactly what
sample.py runs per respaced step. Timing: warm-up, then the median of --repeats runs. GFLOP/s counts the
convolutions and matmuls with torch.utils.flop_counter (what the hardware must at least do).
"""
import argparse
import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from classifier import ClassifierConfig
from ddpm import DiffusionConfig
from guidance import multi_guidance
from train import PRESETS
from unet import UNetConfig, autocast, count_parameters


def timed(fn, repeats, device):
    fn()                                     # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_config(name, unet_cfg, clf_cfg, batch, modes, repeats, device):
    diffusion = DiffusionConfig().build()
    sampler = diffusion.respace(64)
    rows = []
    for mode in modes:
        amp, channels_last = mode == "amp", mode == "channels_last"
        torch.manual_seed(0)
        model = unet_cfg.build().to(device)
        clf = clf_cfg.build().to(device).eval()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model, ema = model.to(memory_format=fmt), ema.to(memory_format=fmt)
        x = torch.randn(batch, unet_cfg.in_channels, unet_cfg.image_size, unet_cfg.image_size,
                        device=device).contiguous(memory_format=fmt)
        t = torch.randint(0, diffusion.num_steps, (batch,), device=device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
        params, ema_params = list(model.parameters()), list(ema.parameters())

        def train_step():
            with autocast(device, amp):
                loss = diffusion.training_losses(model, x, t)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            torch._foreach_lerp_(ema_params, params, 1e-4)

        cond_fn = multi_guidance([clf], [[30.0, 30.0]])
        ts = torch.full((batch,), 32, dtype=torch.long, device=device)

        def net(xx, tt):
            with autocast(device, amp):
                return ema(xx, tt)

        def sample_step(guided=True):
            with torch.no_grad():
                sampler.p_sample(net, x, ts, cond_fn=cond_fn if guided else None)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_s = timed(train_step, repeats, device)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
        guided_s = timed(sample_step, repeats, device)
        unguided_s = timed(lambda: sample_step(False), repeats, device)
        flops = count_flops(train_step)
        rows.append(dict(config=name, params=f"{count_parameters(model) / 1e6:.2f}M", mode=mode, batch=batch,
                         train_ms=1e3 * train_s, train_img_s=batch / train_s, gflops=flops / train_s / 1e9,
                         guided_ms=1e3 * guided_s, unguided_ms=1e3 * unguided_s, peak_gib=peak))
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = ("| config | params | mode | batch | train ms/step | train img/s | train GFLOP/s | guided sample ms/step "
          "| unguided sample ms/step | peak GiB |\n|---|---|---|---|---|---|---|---|---|---|")


def format_row(r):
    return (f"| {r['config']} | {r['params']} | {r['mode']} | {r['batch']} | {r['train_ms']:.0f} | "
            f"{r['train_img_s']:.1f} | {r['gflops']:.1f} | {r['guided_ms']:.0f} | {r['unguided_ms']:.0f} | "
            f"{r['peak_gib']:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-batch", type=int, default=64, help="batch of the CPU-preset rows")
    p.add_argument("--paper-batch", type=int, default=2, help="batch of the paper-config rows")
    p.add_argument("--modes", default="fp32,amp,channels_last")
    p.add_argument("--skip-paper", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    modes = args.modes.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(HEADER)
    cpu = PRESETS["cpu"]
    bench_config("cpu preset 32px", UNetConfig(image_size=32, **cpu["unet"]),
                 ClassifierConfig(image_size=32, **cpu["clf"]), args.cpu_batch, modes, args.repeats, device)
    if not args.skip_paper:
        bench_config("paper 64px", UNetConfig(), ClassifierConfig(), args.paper_batch, modes,
                     max(2, args.repeats // 2), device)


if __name__ == "__main__":
    main()
