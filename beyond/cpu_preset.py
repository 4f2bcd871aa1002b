"""The CPU preset: the paper's method scaled down to minutes on a 2-core laptop CPU, plus three additions.

None of this is in [ZSI]. `--preset paper` uses none of it (a test builds that path and checks). The preset's
values each carry their reason; the additions are wrappers of one shape around what the paper's method
already has, so ddpm.py, classifier.py and guidance.py stay the paper's algorithm:

  dc_corrected(model, diffusion, mean, var)  model -> model     ε̂'s per-image channel means replaced by
                                                                 their posterior mean given x_t
  MirrorEquivariant(classifier)              classifier -> classifier  logits(flip x) = swap(logits(x))
  guidance_window(cond_fn, guide_t_min)      cond_fn -> cond_fn  no classifier gradient below t = guide_t_min

`Additions` says which of the three a sampling run uses and applies them; sample.py builds it and calls it in one
place, so a reader sees at the call site what differs from the paper. Measured effect of each on the demo DDPM
(paper method / + each addition / all three, same seeds): RESULTS.md, "The CPU preset and its three additions".
Flags: --dc-correction, --mirror-equivariant, --guide-t-min.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from cli import InputError
from data import load_data

PRESET = dict(
    image_size=32,            # circles at 32x32 (paper: 64): 4x fewer pixels, same radius-2 disc
    unet=dict(model_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,),
              num_heads=4),   # 0.72M params; a batch-32 step costs half a batch-64 step (fp32, 2 cores)
    steps=1800, batch_size=32, lr=5e-4, ema=0.995,   # short run: larger lr, faster EMA; batch 32 x 1800 = 82%
                              # of the compute of 64 x 1100, fewer broken samples over DDPM seeds (RESULTS.md)
    lr_decay=0.0,             # constant; 0.4 fewer unguided middle circles, worse guidance (RESULTS.md)
    clf=dict(model_channels=16, num_res_blocks=1, attention_resolutions=(8,), channel_mult=(1, 2, 2)),
    clf_steps=800, clf_batch_size=64, clf_lr=3e-4,
    eval_steps=1000, eval_width=16,
    sample_steps=64,
    dc_correction=True,       # small U-Nets miss the noise's DC: grey backgrounds without it (dc_corrected)
    mirror_equivariant=True,  # circles only: p = 1/2 on mirror-symmetric images by construction (MirrorEquivariant)
    guide_t_min_fraction=0.375)   # no guidance below t = 3T/8 (1500 of 4000): fewer faded discs (guidance_window)


# ---------------------------------------------------------------------------------------------------
# DC correction of ε̂ (a model wrapper)
# ---------------------------------------------------------------------------------------------------

def channel_mean_stats(images_u8):
    """Mean and variance over the data set of each image's channel means in [-1, 1] units (the "DC" prior of
    `dc_corrected`), as dict(mean=[C], var=[C]) of floats. images_u8: uint8 [N, H, W, C]."""
    dc = images_u8.reshape(len(images_u8), -1, images_u8.shape[-1]).mean(axis=1, dtype=np.float64) / 127.5 - 1
    return dict(mean=dc.mean(axis=0).tolist(), var=dc.var(axis=0).tolist())


def dc_corrected(model, diffusion, mean, var):
    """The model with ε̂'s per-image channel means (its "DC") replaced by E[DC(ε) | DC(x_t)].

    Why: a GroupNorm U-Net barely sees the mean of its input, so a small one predicts DC(ε̂) ≈ 0 whatever
    DC(x_t) is; x̂_0 absorbs the missed DC amplified by 1/sqrt(ᾱ_t), and every CPU sample ends on its own
    random grey background (RESULTS.md). The DC of x_t is u = sqrt(ᾱ) u_0 + sqrt(1-ᾱ) u_ε with u_ε ~ N(0, 1/n)
    exactly (n pixels) and u_0 ~ N(m, s²) for the data (mean m, variance s² of its per-image channel means,
    `channel_mean_stats` of the training set). The posterior mean is linear (Gaussian conditioning):

        E[u_ε | u] = sqrt(1-ᾱ)/n / (ᾱ s² + (1-ᾱ)/n) · (u − sqrt(ᾱ) m).

    s² = 0 (every circles image has the same mean) gives (u − sqrt(ᾱ) m)/sqrt(1-ᾱ): x̂_0's mean is then m
    exactly; a large s² (faces) leaves at most a small pull towards m at low noise.

    model(x_t, t, **kw) -> [N, C or 2C, H, W] with t the original timesteps (as the samplers call it);
    diffusion: the (respaced) chain sampled with, whose ᾱ is looked up by original timestep; mean, var: [C].
    The v channels of a learned variance pass through unchanged.
    """
    table = torch.zeros(int(diffusion.timestep_map.max()) + 1, dtype=torch.float64)
    table[torch.from_numpy(np.asarray(diffusion.timestep_map))] = torch.from_numpy(diffusion.alphas_cumprod)
    prior = [torch.as_tensor(a, dtype=torch.float32).view(1, -1, 1, 1) for a in (mean, var)]

    def corrected(x_t, t, **kwargs):
        out = model(x_t, t, **kwargs)
        c = x_t.shape[1]
        m, s2 = (a.to(x_t.device) for a in prior)
        n = x_t.shape[2] * x_t.shape[3]
        abar = table[t.cpu()].to(device=x_t.device, dtype=torch.float32).view(-1, 1, 1, 1)
        u = x_t.mean(dim=(2, 3), keepdim=True)
        gain = (1 - abar).sqrt() / n / (abar * s2 + (1 - abar) / n)
        eps = out[:, :c]
        eps = eps - eps.mean(dim=(2, 3), keepdim=True) + gain * (u - abar.sqrt() * m)
        return torch.cat([eps, out[:, c:]], dim=1)

    return corrected


# ---------------------------------------------------------------------------------------------------
# Mirror-equivariant classifier head (a classifier wrapper)
# ---------------------------------------------------------------------------------------------------

class MirrorEquivariant(nn.Module):
    """logits(x) = g(x) + swap(g(flip x)) for a 2-class classifier g, so that logits(flip x) = swap(logits(x))
    for every x and p = 1/2 on every mirror-symmetric image.

    The circles data has this symmetry (a circle at x has label 1[x >= W/2]); plain mirror augmentation only
    imposes it on training images, this imposes it in the unseen middle too. One batched forward of 2N.
    The wrapper adds no weights: its state_dict is the classifier's, so checkpoints hold the classifier alone.
    """

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x, t):
        """x: [N, C, H, W], t: [N] -> float32 logits [N, 2]."""
        g, g_flip = self.classifier(torch.cat([x, x.flip(-1)]), torch.cat([t, t])).chunk(2)
        return g + g_flip.flip(-1)

    def features(self, x, t):
        return self.classifier.features(x, t)

    def state_dict(self, *args, **kwargs):
        return self.classifier.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        return self.classifier.load_state_dict(state_dict, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Guidance window (a cond_fn wrapper)
# ---------------------------------------------------------------------------------------------------

def guidance_window(cond_fn, guide_t_min):
    """cond_fn applied only where t >= guide_t_min (original timesteps), 0 below; a batch entirely below it does
    not call the classifiers at all. The CPU preset stops guiding at low noise, where the gradient's cheapest
    way to p = 1/2 is to fade the disc rather than move it (RESULTS.md). guide_t_min <= 0 returns cond_fn
    itself: every step guided, as in the paper."""
    if cond_fn is None or guide_t_min <= 0:
        return cond_fn

    def windowed(x_t, t):
        keep = t >= guide_t_min
        if not bool(keep.any()):
            return torch.zeros_like(x_t, dtype=torch.float32)
        return cond_fn(x_t, t) * keep.view(-1, *[1] * (x_t.dim() - 1)).float()

    return windowed


# ---------------------------------------------------------------------------------------------------
# The three, switched on for one sampling run
# ---------------------------------------------------------------------------------------------------

def dc_prior(config, dc_correction=None):
    """(mean, var) of the data's per-image channel means for `dc_corrected`, or None for no correction.

    dc_correction: True / False, or None for the run's setting (runs trained before it existed: off). Runs saved
    before the statistics were stored get them recomputed for synthetic data; other data raises InputError.
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


@dataclass
class Additions:
    """The CPU preset's additions one sampling run uses; the default, Additions(), is none: the paper's method.

    dc_prior: (mean [C], var [C]) of `dc_prior`, or None (no DC correction); mirror: one bool per guidance
    classifier (wrap it in MirrorEquivariant, as it was trained); guide_t_min: no guidance below this original
    timestep (0: every step). Each method returns its input unchanged when its addition is off.
    """
    dc_prior: tuple = None
    mirror: tuple = ()
    guide_t_min: int = 0

    @classmethod
    def of_run(cls, config, classifier_configs, dc_correction=None, guide_t_min=0):
        """The run's choices (config.json and each classifier's config), --dc-correction overriding the first."""
        return cls(dc_prior(config, dc_correction),
                   tuple(c["classifier"].get("mirror_equivariant", False) for c in classifier_configs), guide_t_min)

    def denoiser(self, net, diffusion):
        """net(x_t, t, **kw) DC-corrected with ᾱ of `diffusion`, the chain sampled with (`dc_corrected`)."""
        return net if self.dc_prior is None else dc_corrected(net, diffusion, *self.dc_prior)

    def classifiers(self, classifiers):
        """The guidance classifiers, each in the mirror-equivariant head it was trained with (`MirrorEquivariant`)."""
        return [MirrorEquivariant(c) if m else c for c, m in zip(classifiers, self.mirror or [False] * len(classifiers))]

    def cond_fn(self, cond_fn):
        """cond_fn inside the guidance window t >= guide_t_min (`guidance_window`)."""
        return cond_fn if cond_fn is None or self.guide_t_min <= 0 else guidance_window(cond_fn, self.guide_t_min)

    def __str__(self):
        on = (["DC correction"] * (self.dc_prior is not None) + ["mirror-equivariant head"] * any(self.mirror)
              + [f"guidance only at t >= {self.guide_t_min}"] * (self.guide_t_min > 0))
        return ", ".join(on) if on else "none (the paper's method)"
