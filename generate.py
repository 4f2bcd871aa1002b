"""Draw samples from a trained DDPM: the network as the sampler sees it, in seeded batches, over torchrun processes.

The sampling itself is ddpm.py's (ancestral [DDPM Alg. 2] or DDIM [DDIM eq. 12], guided through a cond_fn of
guidance.py); this file only wraps the network (mixed precision, classifier-free guidance [ZSI App. J], and the
CPU preset's DC correction) and splits the work. train.py draws its unguided samples after training with
it, sample.py everything else.
"""
import sys
import time

import numpy as np
import torch
import torch.distributed as tdist

from cli import InputError
from cpu_preset import channel_mean_stats, dc_corrected
from data import load_data, to_uint8
from device import amp_model
from guidance import classifier_free


def default_batch_size(device):
    """Samples per batch: 64 on CPU, 256 on GPUs. On the 2-core CPU, 64 is 11-17% faster per image than 256 with the
    mirror-equivariant classifier (its batch is 2N) and the same with the paper's head (RESULTS.md, Speed)."""
    return 64 if torch.device(device).type == "cpu" else 256


def dc_prior(config, dc_correction=None):
    """(mean, var) of the data's per-image channel means for cpu_preset.dc_corrected, or None for no correction.

    dc_correction: True / False, or None for the run's setting (runs trained before it existed: off). Runs saved
    before the statistics were stored get them recomputed for synthetic data.
    """
    use = config.get("dc_correction", False) if dc_correction is None else dc_correction
    if not use:
        return None
    prior = config.get("dc_prior")
    if prior is None:
        if config["data"]["name"] not in ("circles", "sizes"):
            raise InputError("--dc-correction needs the data statistics saved by train.py since it exists; "
                             "retrain the run or sample with --no-dc-correction")
        prior = channel_mean_stats(load_data(config["data"])[0])
    return prior["mean"], prior["var"]


def sampling_model(model, diffusion, device, amp, channels_last=False, cfg=None, dc=None):
    """The network as the samplers call it, net(x_t, t, **kw) -> float32: under autocast, combined over the labels
    for classifier-free guidance when cfg = (λ, K) [ZSI eq. 12], and DC-corrected when dc = (mean, var)
    (cpu_preset.dc_corrected, with ᾱ of `diffusion`, the chain sampled with)."""
    net = amp_model(model, device, amp, channels_last)
    if cfg is not None:
        net = classifier_free(net, *cfg)
    if dc is not None:
        net = dc_corrected(net, diffusion, *dc)
    return net


def generate(model, diffusion, num_samples, batch_size=None, amp=True, device="cpu", seed=0, cond_fn=None,
             ddim=False, eta=0.0, verbose=False, channels_last=False, cfg=None, dc=None, shard=(0, 1),
             guide_at="x_t", corrector=None, resample=None):
    """uint8 [N, H, W, C] samples. Batch b draws its noise from a CPU generator seeded with seed + 1000003·b, so
    the samples depend on (seed, batch size) only, not on how many processes share the work.

    shard = (rank, world): this process samples batches b ≡ rank (mod world) and the result is gathered on every
    rank (torchrun). channels_last runs the U-Net in NHWC memory format (faster on CPU, RESULTS.md), same math up
    to float rounding. cfg, dc: see `sampling_model`. corrector, resample: ancestral only, see ddpm.p_sample_loop
    (each batch is one population of particles). verbose prints progress with rate and ETA.
    """
    device = torch.device(device)
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    rank, world = shard
    net = sampling_model(model, diffusion, device, amp, channels_last, cfg, dc)
    starts = list(range(0, num_samples, batch_size))
    out, t0 = {}, time.time()
    for i in starts[rank::world]:
        b = min(batch_size, num_samples - i)
        gen = torch.Generator().manual_seed(seed + 1_000_003 * (i // batch_size))
        shape = (b, model.in_channels, model.image_size, model.image_size)
        loop = diffusion.ddim_sample_loop if ddim else diffusion.p_sample_loop
        kwargs = dict(eta=eta) if ddim else dict(guide_at=guide_at, corrector=corrector, resample=resample)
        x = loop(net, shape, cond_fn=cond_fn, generator=gen, device=device,
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
