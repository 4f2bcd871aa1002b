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

Classifier-free multi-guidance [ZSI App. J, eq. 12] is a wrapper of the denoiser, `classifier_free`. Sampling at a
chosen level of the gap (not in the paper) builds its own cond_fns beside this file: beyond/target_guidance.py.
"""
import torch


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
