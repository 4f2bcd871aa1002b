"""Draw samples from a trained DDPM: the network as the sampler sees it, in seeded batches, over torchrun processes.

The sampling itself is ddpm.py's (ancestral [DDPM Alg. 2] or DDIM [DDIM eq. 12], guided through a cond_fn of
guidance.py); this file only wraps the network (mixed precision, classifier-free guidance [ZSI App. J]) and splits
the work. train.py draws its unguided samples after training with it, sample.py everything else.
"""
import sys
import time

import numpy as np
import torch
import torch.distributed as tdist

from data import to_uint8
from guidance import classifier_free
from infra.device import amp_model


def default_batch_size(device):
    """Samples per batch: 64 on CPU, 256 on GPUs. On the 2-core CPU, 64 is 11-17% faster per image than 256 with the
    mirror-equivariant classifier (its batch is 2N) and the same with the paper's head (RESULTS.md, Speed)."""
    return 64 if torch.device(device).type == "cpu" else 256


def sampling_model(model, device, amp, channels_last=False, cfg=None):
    """The network as the samplers call it, net(x_t, t, **kw) -> float32: under autocast, and combined over the
    labels for classifier-free guidance when cfg = (λ, K) [ZSI eq. 12]."""
    net = amp_model(model, device, amp, channels_last)
    return net if cfg is None else classifier_free(net, *cfg)


def generate(net, diffusion, shape, num_samples, batch_size=None, device="cpu", seed=0, cond_fn=None, ddim=False,
             eta=0.0, guide_at="x_t", loop=None, verbose=False, shard=(0, 1)):
    """uint8 [N, H, W, C] samples of net(x_t, t) (`sampling_model`) on the chain `diffusion`. shape: (C, H, W).

    Batch b draws its noise from a CPU generator seeded with seed + 1000003·b, so the samples depend on (seed, batch
    size) only, not on how many processes share the work. shard = (rank, world): this process samples batches
    b ≡ rank (mod world) and the result is gathered on every rank (torchrun). loop: the sampler, ancestral
    (diffusion.p_sample_loop, guided at `guide_at`) or DDIM with η = eta when None, else a function with
    p_sample_loop's arguments (beyond/target_guidance.p_sample_loop with its corrector or resampling). verbose
    prints progress with rate and ETA.
    """
    device = torch.device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    rank, world = shard
    if loop is None:
        loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
        kwargs = dict(eta=eta) if ddim else dict(guide_at=guide_at)
    else:
        kwargs = dict(guide_at=guide_at)
    starts = list(range(0, num_samples, batch_size))
    out, t0 = {}, time.time()
    for i in starts[rank::world]:
        b = min(batch_size, num_samples - i)
        gen = torch.Generator().manual_seed(seed + 1_000_003 * (i // batch_size))
        x = loop(net, (b, *shape), cond_fn=cond_fn, generator=gen, device=device,
                 progress=verbose and sys.stderr.isatty(), **kwargs)
        out[i] = to_uint8(x)
        if verbose:
            done = sum(len(v) for v in out.values()) * world
            rate = done / (time.time() - t0)
            print(f"[sample] ~{min(done, num_samples)}/{num_samples} images | {rate:.2f} img/s | "
                  f"ETA {max(0, num_samples - done) / rate:.0f}s", flush=True)
    if world > 1:
        parts = [None] * world
        tdist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    return np.concatenate([out[i] for i in starts])
