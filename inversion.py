"""DDIM inversion and what it enables: latent interpolation (App. M) and attribute editing (App. N).

[ZSI] App. M: invert two real images deterministically (DDIM, η = 0) to a noise level t_stop (half of T in
the paper), interpolate the two latents with slerp (spherical; lerp for comparison), decode with DDIM η = 0.
App. N: invert an image to t_start, then denoise with classifier guidance using DDIM with a per-step
η_t = t / t_start (deterministic near the data, stochastic near the latent), which keeps the image's layout
while the guidance changes the attribute. Both run on a respaced chain; indices are respaced steps.
"""
import numpy as np
import torch


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


def inversion_index(t_fraction, num_steps):
    """The respaced index of the latent at `t_fraction` in (0, 1] of a K-step chain: round(t_fraction·(K-1)),
    at least 1.

    x_0 sits at index 0 and ddim_reverse_loop(t_stop) runs t_stop reverse steps, so the reachable latents are
    the indices 1..K-1 (original timesteps timestep_map[1..K-1]); t_fraction = 1 is index K-1, original
    t = T-1, the whole chain. A one-step chain has no latent to invert to.
    """
    if num_steps < 2:
        raise ValueError(f"--interpolate / --edit invert to a respaced index in 1..steps-1, so they need --steps 2 "
                         f"or more; got {num_steps}")
    if not 0 < t_fraction <= 1:
        raise ValueError(f"--t-fraction must be in (0, 1], got {t_fraction}")
    return min(num_steps - 1, max(1, round(t_fraction * (num_steps - 1))))


def _check_index(diffusion, t_stop):
    if not 1 <= t_stop <= diffusion.num_steps - 1:
        raise ValueError(f"inversion index {t_stop} is outside 1..{diffusion.num_steps - 1}, the latents of a "
                         f"{diffusion.num_steps}-step chain")


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
