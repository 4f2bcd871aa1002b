"""Sampling at a chosen level of the gap (beyond/target.py; not in the paper): the cond_fns, potentials and samplers
it adds beside the paper's multi-guidance (guidance.py) and ancestral sampler (ddpm.py).

  target_guidance   cond_fn pulling p(y | x_t, t) towards a target q (kl: multi-guidance [ZSI eq. 2] with weights
                    λ·q; mse; logit)
  target_potential  the logit loss as a potential log G for sequential Monte Carlo
  shift_averaged    a classifier averaged over small translations (test-time augmentation)
  langevin_step     one unadjusted Langevin corrector step on the guided score [SDE Alg. 2], [RRR Sec. 4]
  p_sample_loop     ddpm.GaussianDiffusion.p_sample_loop with Langevin corrector steps and SMC resampling on a
                    potential [FK Sec. 3], [TDS]; without either it draws exactly what the paper's sampler draws
"""
import torch
import torch.nn.functional as F


def target_guidance(classifier, q, scale, loss="kl"):
    """cond_fn pulling the classifier's p(y | x_t, t) towards a target distribution q over its K classes.

    loss="kl":  g = ∇_{x_t} -scale·KL(q ‖ p) = scale·Σ_m q_m ∇ log p_m, which is multi-guidance [ZSI eq. 2] with the
                asymmetric weights λ_m = scale·q_m; for two classes (logit f, p = σ(f)) g = scale·(q_1 − p_1)·∇f,
                zero exactly where p(class 1 | x_t) = q_1. q = (1/2, 1/2), scale 60 is the paper's λ = 30, 30.
    loss="mse": g = ∇_{x_t} -(scale/2)·‖p − q‖², the same fixed point with an extra factor p_m(1 − p_m): weaker
                where the classifier is sure.
    loss="logit": two classes only: g = ∇_{x_t} -(scale/2)·(f − f*)², f = log p_1 − log p_0 and f* = log(q_1/q_0):
                a pull that grows with the distance in logits instead of saturating at scale·q like kl's.
    q: [K] weights summing to 1, or a function t -> [N, K] (a target that changes with the noise level; t the
    original timesteps [N]). Returns cond_fn(x_t, t) -> g [N, C, H, W], float32, one forward and backward per step.
    Raises ValueError for an unknown loss.
    """
    if loss not in ("kl", "mse", "logit"):
        raise ValueError(f"unknown target loss {loss!r}; choose kl, mse or logit")
    target = as_target(q)

    def cond_fn(x_t, t):
        with torch.enable_grad(), torch.autocast(x_t.device.type, enabled=False):
            x = x_t.detach().float().requires_grad_(True)
            log_p = torch.log_softmax(classifier(x, t).float(), dim=-1)      # [N, K]
            q_t = target(t).to(x.device)                                     # [N, K]
            if loss == "kl":
                objective = (q_t * log_p).sum()
            elif loss == "mse":
                objective = -0.5 * ((log_p.exp() - q_t) ** 2).sum()
            else:
                objective = -0.5 * logit_gap(log_p, q_t).square().sum()
            return scale * torch.autograd.grad(objective, x)[0]

    return cond_fn


def as_target(q):
    """q as a function t [N] -> [N, K]: q itself if it is one, else the fixed weights q [K] repeated."""
    return q if callable(q) else (lambda t, q=torch.as_tensor(q, dtype=torch.float32): q.expand(len(t), -1))


def logit_gap(log_p, q):
    """f − f* [N] for two classes: f = log p_1 − log p_0 from log-probabilities [N, 2], f* = log(q_1/q_0), q [N, 2].

    Each q_m is floored at the smallest normal float of q's dtype (float32: 1.2e-38) before its log, so a target at
    the edge, q = (0, 1) or (1, 0), gives the finite f* = ±87.3 (float32) instead of ±inf: the logit loss and
    target_potential then stay finite (with f* = inf, (f − f*)² was inf, its gradient inf · ∇f or NaN, which put NaN
    into every guided sample, and the potential −inf for every particle made SMC's weights −inf − (−inf) = NaN).
    """
    tiny = torch.finfo(q.dtype).tiny
    return (log_p[:, 1] - log_p[:, 0]) - (torch.log(q[:, 1].clamp_min(tiny)) - torch.log(q[:, 0].clamp_min(tiny)))


def target_potential(classifier, q, scale):
    """log G(x_t, t) = −(scale/2)·(f − f*)² [N]: the logit loss of `target_guidance` as a potential for ddpm's
    sequential Monte Carlo resampling (`p_sample_loop(resample=...)` below), float32, no gradient. classifier: two classes;
    q: [2] or a function t -> [N, 2], as in target_guidance. Not in the paper."""
    target = as_target(q)

    def log_potential(x_t, t):
        with torch.no_grad(), torch.autocast(x_t.device.type, enabled=False):
            log_p = torch.log_softmax(classifier(x_t.float(), t).float(), dim=-1)
            return -0.5 * scale * logit_gap(log_p, target(t).to(x_t.device)).square()

    return log_potential


def shift_averaged(classifier, shifts):
    """The classifier averaged over small diagonal translations: x -> log (1/S) Σ_s softmax(f(shift_s x, t)), [N, K].

    shifts: S >= 1; the image moves by d pixels right and down for d in -⌊S/2⌋ .. S-1-⌊S/2⌋ (replicate padding, so
    the size stays). A strided U-Net classifier trained on the extremes answers differently at positions of
    different phase on its downsampling lattice (a saw-tooth in p along the gap, RESULTS.md); averaging over S
    phases (S = 4 for a classifier that downsamples by 4) leaves p's trend across the gap. Test-time augmentation,
    not in the paper; costs S classifier passes. The output are log-probabilities: log_softmax leaves them as they are.
    """
    if shifts <= 1:
        return classifier
    offsets = [d - shifts // 2 for d in range(shifts)]
    pad = max(abs(d) for d in offsets)

    def averaged(x, t):
        h, w = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        log_p = [torch.log_softmax(classifier(padded[..., pad - d:pad - d + h, pad - d:pad - d + w], t).float(), -1)
                 for d in offsets]
        return torch.logsumexp(torch.stack(log_p), 0) - torch.log(torch.tensor(float(shifts)))

    return averaged


# ---------------------------------------------------------------------------------------------------
# Langevin corrector and sequential Monte Carlo around the paper's ancestral step
# ---------------------------------------------------------------------------------------------------

def langevin_step(diffusion, model, x_t, t, cond_fn=None, step_scale=0.5, noise=None, model_kwargs=None):
    """One unadjusted Langevin (ULA) corrector step at the noise level of x_t [SDE Alg. 2], [RRR Sec. 4]:

        x ← x + ε·s(x) + sqrt(2ε)·z,   s = -ε̂(x, t)/sqrt(1-ᾱ_t) + g(x, t),   ε = step_scale·β_t,

    s the guided score of p_t(x) Π_m p(y_m | x, t)^{λ_m} (the ε-network's score plus cond_fn's gradient), β_t
    the (respaced) beta of `diffusion` (a ddpm.GaussianDiffusion), so step_scale = 1/2 moves as far as the
    predictor's own drift. No Metropolis test (MALA needs log p_t, which an ε-network does not give).
    x_t [N, C, H, W] -> [N, C, H, W].
    """
    eps = diffusion._call(model, x_t, t, **(model_kwargs or {}))[:, :x_t.shape[1]].float()
    score = -eps / diffusion._extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t)
    if cond_fn is not None:
        score = score + diffusion._call(cond_fn, x_t, t).float()
    step = step_scale * diffusion._extract(diffusion.betas, t, x_t)
    noise = torch.randn_like(x_t) if noise is None else noise
    return x_t + step * score + torch.sqrt(2 * step) * noise


def smc_resample(x, log_g, log_w, generator=None):
    """Multinomial resampling [FK Sec. 3]: N draws with replacement from the particles x [N, ...] with probabilities
    softmax(log_w); returns (x, log_g) of the drawn particles and zero log weights. Equal weights: unchanged."""
    if float(log_w.max() - log_w.min()) == 0:
        return x, log_g, log_w
    idx = torch.multinomial(torch.softmax(log_w.double(), 0).cpu(), len(x), replacement=True, generator=generator)
    idx = idx.to(x.device)
    return x[idx], log_g[idx], torch.zeros_like(log_w)


def p_sample_loop(diffusion, model, shape, noise=None, cond_fn=None, clip_denoised=True, model_kwargs=None,
                  progress=False, device=None, generator=None, guide_at="x_t", corrector=None, resample=None):
    """diffusion.p_sample_loop [DDPM Alg. 2] with two additions; [N, C, H, W] = shape.

    corrector: None, or (steps, step_scale, t_min): before each predictor step whose original timestep is
    >= t_min, `steps` Langevin corrector steps (`langevin_step`) on the guided score [SDE Alg. 2].
    resample: None, or (log_potential, every), log_potential(x, t) = log G -> [N]: sequential Monte Carlo with the
    batch as the particles, [FK Sec. 3]'s "difference" potentials, [TDS]: after every `every`-th step and the
    last, particle n's log weight grows by log G(x_n, s) − its previous log G, s the level reached (0 for the
    final sample), and the batch is resampled (multinomial, `generator`) when the effective sample size
    1/Σ w_n² falls below N/2, and once at the end. The weights telescope, so for any `every` the batch samples
    the sampler's own law times G(x_0, 0), exactly as N → ∞ (with cond_fn None, p_θ(x_0)·G(x_0, 0)); the guided
    proposal is not reweighted. Copies of one particle share their history, those drawn at the end are
    identical: fewer distinct samples than N. The noise is drawn in the same order as diffusion.p_sample_loop's,
    corrector noise first, so with neither addition the two draw the same samples.
    """
    device = device or (noise.device if noise is not None else "cpu")
    randn = lambda: torch.randn(*shape, generator=generator).to(device)
    x = randn() if noise is None else noise
    log_w = log_g = torch.zeros(shape[0], device=device)
    for i in diffusion._indices(None, progress):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        if corrector is not None and diffusion.timestep_map[i] >= corrector[2]:
            for _ in range(corrector[0]):
                with torch.no_grad():
                    x = langevin_step(diffusion, model, x, t, cond_fn, corrector[1], randn(), model_kwargs)
        with torch.no_grad():
            x = diffusion.p_sample(model, x, t, cond_fn=cond_fn, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs, noise=randn() if i > 0 else None,
                                   guide_at=guide_at)["sample"]
        if resample is not None and i % resample[1] == 0:
            level = torch.full_like(t, max(i - 1, 0))
            with torch.no_grad():
                new = diffusion._call(resample[0], x, level).float()
            log_w, log_g = log_w + new - log_g, new
            if i == 0 or 1 / torch.softmax(log_w, 0).square().sum() < shape[0] / 2:
                x, log_g, log_w = smc_resample(x, log_g, log_w, generator)
    return x
