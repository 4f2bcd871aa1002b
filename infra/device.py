"""Where the networks run: device choice, mixed precision (AMP), torchrun processes, and the host facts that
every report records (none of this is in the paper; it decides speed, and on a CPU also which samples are drawn).

AMP is on by default on CUDA (fp16 with a GradScaler) and on CPUs with native bf16 instructions (AMX or
AVX512-BF16), off elsewhere: without them bf16 convolutions are 7-15x slower than fp32 (RESULTS.md, Speed).
So the default precision, and with it the exact samples of a seed, differ between hosts: `host_info()` goes
into every report so a figure can be traced to the host and mode that drew it.
"""
import contextlib
import os
import platform
import sys

import torch
import torch.distributed as tdist

from cli import InputError, TrainingError


def resolve_device(name):
    """'auto' -> cuda if visible else cpu; 'cuda[:N]' without a GPU raises InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def _cpuinfo():
    try:
        return open("/proc/cpuinfo").read()
    except OSError:   # not Linux
        return ""


def cpu_flags():
    """The CPU's instruction-set flags that decide speed and the AMP default (Linux /proc/cpuinfo; else [])."""
    flags = _cpuinfo().split()
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's processor or machine name."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16():
    """True where the CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & set(cpu_flags()))


def amp_default(device):
    """Autocast on by default where it is faster: always on CUDA, on CPU only with native bf16."""
    return torch.device(device).type == "cuda" or cpu_has_fast_bf16()


def amp_dtype(device):
    """fp16 on CUDA (with a GradScaler), bf16 on CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(device, enabled):
    """The one mixed-precision context of the codebase; disabled, the float32 reference path."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype(device))


def grad_scaler(device, amp):
    """fit's loss scaler: on with AMP on CUDA (fp16 gradients underflow without it), off elsewhere (bf16 needs none).
    A disabled scaler's state_dict is {}: a run resumed with AMP switched on starts a fresh scale (train.fit)."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")


def amp_model(model, device, amp, channels_last=False):
    """model(x, t, **kw) under `autocast` (optionally in channels_last memory format), returning float32."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=fmt)

    def net(x, t, **kwargs):
        with autocast(device, amp):
            return model(x.contiguous(memory_format=fmt), t, **kwargs).float().contiguous()
    return net


def host_info(device, amp):
    """What a report records about where it was produced: CPU flags or GPU name, AMP mode, torch version."""
    device = torch.device(device)
    info = dict(device=device.type, cpu=cpu_model(), cpu_flags=cpu_flags(),
                threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["amp"] = (str(amp_dtype(device)).replace("torch.", "") if amp else "off")
    return info


def setup_distributed(device):
    """(rank, world, device) under torchrun (WORLD_SIZE > 1: NCCL on GPUs, gloo on CPU), else (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"torchrun started process {local_rank} on this node but only "
                             f"{torch.cuda.device_count()} GPU(s) are visible: use --nproc_per_node "
                             f"{torch.cuda.device_count()}, or --device cpu for CPU processes (gloo)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        sys.stdout = open(os.devnull, "w")   # rank 0 alone prints progress
    return rank, world, device


def global_batch_numbers(loss, logs, rows, world):
    """(finite, loss, logs) of a training step's global batch. Each rank's loss and logged numbers are means over its
    `rows` rows; under torchrun they are all-reduced, weighted by `rows`, in one collective with the count of ranks
    whose loss is not finite. So rank 0 logs the global batch's numbers, not its own part's, and every rank skips a
    non-finite step together (a rank skipping alone would pair its next backward with the others' current one)."""
    values = torch.tensor([float(loss.detach()), *map(float, logs.values())], dtype=torch.float64)
    finite = bool(torch.isfinite(values[0]))
    if world > 1:
        packed = torch.cat([values * rows, torch.tensor([rows, float(not finite)], dtype=torch.float64)])
        packed = packed.to(loss.device)
        tdist.all_reduce(packed)
        packed = packed.cpu()
        values, finite = packed[:-2] / packed[-2], bool(packed[-1] == 0)
    return finite, float(values[0]), dict(zip(logs, values[1:].tolist()))


def check_in_sync(model, label, world):
    """All ranks must hold identical parameters after training (DDP all-reduces gradients)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise TrainingError(f"{label}: parameters differ across the {world} ranks after training")
    print(f"[{label}] parameters identical on all {world} ranks", flush=True)
