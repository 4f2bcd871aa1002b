"""Classifier guidance, multi-guidance and classifier-free guidance as functions the samplers take.

Multi-guidance ([ZSI] Sec. 4.2, eq. 2): sample from p(x) Π_k Π_m p_k(y_m | x)^{λ_km}, whose score adds
    g(x_t, t) = ∇_{x_t} Σ_k Σ_m λ_km log p_k(y_m | x_t, t)
to the unconditional one. With one classifier and λ = (30, 30) this is the paper's headline: the two
extremes pull against each other and samples land where the classifier is unsure, the unseen middle.
Regular classifier guidance [ADM Alg. 1] is the special case of a single non-zero weight.

`multi_guidance(...)` returns `cond_fn(x_t, t) -> g` for ddpm.GaussianDiffusion's samplers: one forward and one
backward per classifier per step whatever the number of classes, in float32. As in guided-diffusion, the
gradient is taken at x_t with the original timestep (GaussianDiffusion maps respaced indices back before calling);
[ZSI] Sec. 2.2 writes it at μ_θ(x_t, t) instead (docs/paper_notes.md §16.5). The sampler then shifts the mean by
Σ ⊙ g (ancestral, `condition_mean`) or ε by -sqrt(1-ᾱ_t) g (DDIM, `condition_score`). The paper guides every
step; the CPU preset's guidance window is a wrapper of the cond_fn made here (cpu_preset.guidance_window).

For sampling at a chosen level of the gap (target.py; not in the paper): `target_guidance` pulls p(y | x_t) towards
a target q, `target_potential` is the same aim as a potential for ddpm's sequential Monte Carlo resampling, and
`shift_averaged` averages a classifier over small translations.
"""
import torch
import torch.nn.functional as F


def multi_guidance(classifiers, lambdas):
    """cond_fn for Σ_k Σ_m λ_km log p_k(y_m | x_t, t).

    classifiers: list of networks f_k(x, t) -> logits [N, K_k]; lambdas: list of weight vectors, one per
    classifier, λ_km multiplying log p_k(class m). Returns None when every weight is 0 (unguided).
    """
    weights = [torch.as_tensor(l, dtype=torch.float32) for l in lambdas]
    assert len(classifiers) == len(weights), "one weight vector per classifier"
    if all(float(w.abs().sum()) == 0 for w in weights):
        return None

    def cond_fn(x_t, t):
        with torch.enable_grad(), torch.autocast(x_t.device.type, enabled=False):
            x = x_t.detach().float().requires_grad_(True)
            total = 0.0
            for clf, w in zip(classifiers, weights):
                log_p = torch.log_softmax(clf(x, t).float(), dim=-1)       # [N, K]
                total = total + (log_p * w.to(x.device)).sum()
            return torch.autograd.grad(total, x)[0]

    return cond_fn


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
    sequential Monte Carlo resampling (p_sample_loop(resample=...)), float32, no gradient. classifier: two classes;
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


def classifier_free(model, lambda_, num_classes):
    """Classifier-free multi-guidance [ZSI App. J, eq. 12] as a model wrapper.

    ε̂ = -λ·ε̂(x, ∅) + (1 + λ)·(1/K) Σ_c ε̂(x, c), with ∅ = label `num_classes` (the null embedding, trained
    with label dropout). The paper prints (1 - λ); the official code uses (1 + λ), which makes the coefficients
    sum to 1 as in [CFG]; we follow the code.

    Only ε̂ (the first C channels, C = x's channels) is guided. With a learned variance the v channels come from
    the conditional branch, (1/K) Σ_c v(x, c), as GLIDE and DiT do: v interpolates log β̃_t and log β_t
    [IDDPM eq. 15], and extrapolating it would put Σ outside [β̃_t, β_t] (at λ = 3, v_c = 0.9 and v_∅ = -0.9
    give v = 6.3, a variance far above β_t). The official code combines every output channel, which is mild at
    its configured λ = 0.1 (v moves by at most 0.1·|v_c - v_∅|) but unbounded at larger λ.
    """
    def guided(x, t, **kwargs):
        n, c = x.shape[0], x.shape[1]
        labels = torch.arange(num_classes + 1, device=x.device).repeat_interleave(n)
        out = model(x.repeat(num_classes + 1, 1, 1, 1), t.repeat(num_classes + 1), y=labels)
        out = out.view(num_classes + 1, n, *out.shape[1:])
        cond = out[:-1].mean(0)                                  # (1/K) Σ_c out(x, c)
        eps = -lambda_ * out[-1, :, :c] + (1 + lambda_) * cond[:, :c]
        return torch.cat([eps, cond[:, c:]], dim=1)

    return guided
