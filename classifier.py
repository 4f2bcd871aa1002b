"""Noisy guidance classifier p(y | x_t, t), spectral normalisation and temperature scaling.

[ZSI] Sec. 4.2 / 5.5 and docs/paper_notes.md §3: the "encoder half" of the U-Net [ADM sec. 4] (the same
ResBlocks and attention as unet.py, resblock_updown, attention pooling) with K outputs, trained with
cross-entropy on x_t = q_sample(x_0, t) at uniform t of the *same* diffusion chain as the DDPM, with the raw
integer t. Its gradient ∇_{x_t} log p(y | x_t, t) is what guidance.py turns into (multi-)guidance.

Spectral normalisation [Miyato et al. 2018], used by [ZSI] Sec. 5.5 to smooth the classifier in the unseen
middle: every Conv2d/Linear weight W is replaced by lipschitz · W / σ̂(W), σ̂ the largest singular value of
W reshaped to (out, in·k·k), estimated by power iteration with persistent u/v buffers (n iterations per
training forward, none in eval). Differences from the official copy (docs/paper_notes.md §3.3, §16.15), all on
purpose: the Lipschitz factor is saved with the model (the official sampler silently doubled it); biases are
left alone (the official code projects them to unit norm, which bounds nothing); zero-initialised layers pass
through unnormalised while σ̂ = 0, as in the official code, but are normalised as soon as they become non-zero
(the official power iteration got stuck at u = v = 0 and never normalised them).

Temperature scaling [Guo et al. 2017]: one scalar T fitted on held-out logits by minimising the NLL, stored
in the model as a buffer, reported with the 15-bin ECE before and after.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from unet import AttentionBlock, build_encoder, normalization, time_mlp, timestep_embedding


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: prepend the mean token, add a learned position embedding, attend,
    project; the output is the mean token's [ADM sec. 4]."""

    def __init__(self, spatial, embed_dim, num_head_channels, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = max(1, embed_dim // num_head_channels)

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding.to(x.dtype)
        q, k, v = self.qkv_proj(x.transpose(1, 2)).reshape(b, -1, 3, self.num_heads, c // self.num_heads) \
            .permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)[:, :, :1]                 # only the pooled token
        return self.c_proj(h.transpose(1, 2).reshape(b, c))


class MeanPool(nn.Module):
    """ADM's "adaptive" head: global average over positions, then a linear map to K logits. Position
    enters only through the borders' zero padding, so the logit varies smoothly with an object's place."""

    def __init__(self, embed_dim, output_dim):
        super().__init__()
        self.proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x):
        return self.proj(x.mean(dim=(2, 3)))


@dataclass
class ClassifierConfig:
    """Constructor arguments of the noisy classifier; saved next to every checkpoint."""
    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128               # classifier_width
    num_res_blocks: int = 2                 # classifier_depth
    attention_resolutions: tuple = (32, 16, 8)
    channel_mult: tuple = (1, 2, 3, 4)
    num_head_channels: int = 64
    num_classes: int = 2                    # K outputs (the official code had 1000, sliced to K)
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    spectral_norm: bool = False
    lipschitz: float = 0.5                  # per-layer bound when spectral_norm (official training default)
    n_power_iterations: int = 2
    pool: str = "attention"                 # "attention" (paper) | "adaptive" (ADM's global average pool)

    def build(self):
        kwargs = asdict(self)
        sn = {k: kwargs.pop(k) for k in ("spectral_norm", "lipschitz", "n_power_iterations")}
        model = EncoderUNet(**kwargs)
        if sn["spectral_norm"]:
            apply_spectral_norm(model, sn["lipschitz"], sn["n_power_iterations"])
        return model


def default_channel_mult(image_size):
    """The official `create_classifier` choice of channel_mult per image size."""
    return {128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2), 16: (1, 2, 2)}.get(image_size, (1, 2, 2))


class EncoderUNet(nn.Module):
    """Timestep-conditioned encoder + attention pooling -> K logits (divided by the stored temperature)."""

    def __init__(self, image_size=64, in_channels=3, model_channels=128, num_res_blocks=2,
                 attention_resolutions=(32, 16, 8), channel_mult=(1, 2, 3, 4), num_head_channels=64,
                 num_classes=2, use_scale_shift_norm=True, resblock_updown=True, dropout=0.0, pool="attention"):
        super().__init__()
        if pool not in ("attention", "adaptive"):
            raise ValueError(f"classifier pool {pool!r} unknown; choose attention or adaptive")
        self.model_channels = model_channels
        self.time_embed = time_mlp(model_channels)
        self.input_blocks, self.middle_block, _, ch, res = build_encoder(
            image_size, in_channels, model_channels, num_res_blocks, attention_resolutions, channel_mult,
            1, num_head_channels, dropout, use_scale_shift_norm, resblock_updown)
        self.out_norm = normalization(ch)
        self.pool = AttentionPool2d(res, ch, num_head_channels, num_classes) if pool == "attention" \
            else MeanPool(ch, num_classes)
        self.register_buffer("temperature", torch.ones(()))

    def trunk(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        return F.silu(self.out_norm(self.middle_block(h, emb)))

    def forward(self, x, t):
        """x: [N, C, H, W] noisy images x_t; t: [N] integer timesteps. Returns float32 logits / T [N, K]."""
        return self.pool(self.trunk(x, t)).float() / self.temperature

    def features(self, x, t):
        """Penultimate features: the trunk's output averaged over positions, [N, channels] (App. H, I)."""
        return self.trunk(x, t).mean(dim=(2, 3)).float()


def noisy_classifier_loss(classifier, diffusion, x0, y, generator=None, t=None, noise=None):
    """Cross-entropy of p(y | x_t, t) with t ~ U{0..T-1} and x_t = q_sample(x_0, t) (docs/paper_notes.md §3.2).

    t and noise are drawn from `generator` unless given. Returns (mean loss, logits) for logging accuracy.
    """
    if t is None:
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    logits = classifier(diffusion.q_sample(x0, t, noise), t)
    return F.cross_entropy(logits, y), logits


# ---------------------------------------------------------------------------------------------------
# Spectral normalisation
# ---------------------------------------------------------------------------------------------------

class SpectralNorm(nn.Module):
    """Parametrization W -> lipschitz · W / σ̂(W) with a power-iteration estimate σ̂ = uᵀ W v."""

    def __init__(self, weight, lipschitz=0.5, n_power_iterations=2, eps=1e-12):
        super().__init__()
        self.lipschitz, self.n_power_iterations, self.eps = lipschitz, n_power_iterations, eps
        mat = weight.detach().flatten(1)
        self.register_buffer("_u", F.normalize(torch.randn(mat.shape[0]), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(torch.randn(mat.shape[1]), dim=0, eps=eps))
        self._power_iteration(mat, 100)  # converge once; training keeps it converged

    @torch.no_grad()
    def _power_iteration(self, mat, n):
        """n steps of u <- Wv/|Wv|, then v <- Wᵀu/|Wᵀu| from that *new* u [Miyato et al. 2018, Alg. 1].

        The order is torch.nn.utils.parametrizations.spectral_norm's, so the same buffers give the same σ̂.
        Each vector is computed from the other's latest value: one chain, so σ̂ = uᵀWv = |Wᵀu| >= 0 and it
        rises to σ_max(W). A zero product (a zero-initialised layer) leaves that vector unchanged instead of
        zeroing it, so the iteration resumes as soon as the weight becomes non-zero.
        """
        for _ in range(n):
            for vec, other, m in ((self._u, self._v, mat), (self._v, self._u, mat.t())):
                new = m @ other
                norm = new.norm()
                if norm > self.eps:
                    vec.copy_(new / norm)

    def sigma(self, weight):
        """σ̂ = uᵀ W v, W the weight reshaped to (out, in·k·k); gradients flow through W, not through u, v."""
        return torch.dot(self._u, weight.flatten(1) @ self._v)

    def forward(self, weight):
        """lipschitz · W / σ̂(W); W itself while σ̂(W) <= eps (a zero-initialised layer before its first step).

        The pass-through is the official code's choice and the one that lets such a layer train: the gradient
        of W / σ̂ w.r.t. W scales as 1/σ̂, so dividing by a clamped σ̂ = eps multiplied the first gradient of a
        zero weight by lipschitz / eps (5e11). AdamW then stepped by -lr·sign(g) once and carried a second-
        moment estimate ~1e15 too large, which froze the layer at ±lr for the rest of any run. Passed through,
        the first gradient is the plain one; from the first step on, σ̂ >= the size of one Adam step (~lr), so
        the factor lipschitz / σ̂ grows at most to ~lipschitz / lr and then falls as the weight grows: later
        gradients are larger than the first, which Adam's moments follow within a few steps.
        """
        if self.training:
            self._power_iteration(weight.detach().flatten(1).float(), self.n_power_iterations)
        sigma = self.sigma(weight).abs()
        degenerate = sigma <= self.eps
        scale = torch.where(degenerate, torch.ones_like(sigma), self.lipschitz / sigma.clamp(min=self.eps))
        return weight * scale


def apply_spectral_norm(model, lipschitz=0.5, n_power_iterations=2):
    """Normalise every Conv2d and Linear weight of the convolutional trunk and time MLP.

    As in the official code, the attention layers (AttentionBlock, AttentionPool2d) and GroupNorm are left
    alone. Call before load_state_dict when restoring an SN checkpoint.
    """
    skip = {id(m) for a in model.modules() if isinstance(a, (AttentionBlock, AttentionPool2d))
            for m in a.modules()}
    for module in list(model.modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in skip:
            parametrize.register_parametrization(
                module, "weight", SpectralNorm(module.weight, lipschitz, n_power_iterations))
    return model


@torch.no_grad()
def converge_spectral_norm(model, n_iterations=500):
    """Run every SpectralNorm's power iteration n more times on the layer's *current* weight; returns the count.

    Training iterates on the weight of each forward, before the optimizer step moves it, so after the last
    step u, v lag one update behind and the bound can be exceeded by a few percent (most in zero-initialised
    layers, whose small weights move the most in relative terms). Call after training, before evaluating or
    saving: in eval mode the buffers are not updated.
    """
    count = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, SpectralNorm):
                    p._power_iteration(module.parametrizations.weight.original.detach().flatten(1).float(),
                                       n_iterations)
                    count += 1
    return count


def spectral_norm_sigmas(model):
    """The true largest singular value of every normalised (reshaped) weight, for checking the bound."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            out[name] = torch.linalg.matrix_norm(module.weight.detach().flatten(1), ord=2).item()
    return out


# ---------------------------------------------------------------------------------------------------
# Temperature scaling
# ---------------------------------------------------------------------------------------------------

T_MIN, T_MAX = 0.05, 20.0     # fit_temperature's range: logits are scaled by at most 20 either way


def fit_temperature(logits, labels, max_iter=100):
    """The T in [T_MIN, T_MAX] minimising NLL(softmax(logits / T), labels) [Guo et al. 2017], by L-BFGS on log T.

    The range matters only at degenerate logits, where the NLL has no minimiser at a finite T > 0: perfectly
    separable held-out logits (every label is the argmax) make the NLL fall monotonically as T -> 0, and logits
    carrying no information about the labels (e.g. identical rows over balanced labels) make it fall as T -> inf.
    Unbounded, L-BFGS ran towards 0 or inf until its tolerances stopped it: T = 2.5e-9 on two-class logits of
    margin 0.01, which multiplied the calibrated model's logits by 4e8 and saturated every probability it
    reported (p exactly 0 or 1: ties in every ranking and histogram of p); T = 800 .. 7e4 on identical rows. Searched
    on the clamped range, T ends in [T_MIN, T_MAX], at the bound the NLL falls towards when L-BFGS gets there
    (a nearly flat NLL, e.g. margin 1e-3 at T = 1, can still stop it early, as before). Well-posed logits
    (calibration T of 0.5 .. 3) are unaffected.
    """
    logits, labels = logits.detach().float(), labels.long()
    log_t = torch.zeros(1, requires_grad=True)
    bounds = math.log(T_MIN), math.log(T_MAX)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(*bounds).exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(*bounds).exp())


def expected_calibration_error(probs, labels, n_bins=15):
    """ECE with equal-width confidence bins [Guo et al. 2017 eq. 3]: Σ_b |B_b|/n · |acc(B_b) - conf(B_b)|."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece)


def calibrate(classifier, logits, labels):
    """Fit T on held-out logits (computed at T = 1), store it in the classifier, return a report dict."""
    logits = logits.detach().float()
    temperature = fit_temperature(logits, labels)
    classifier.temperature.fill_(temperature)
    return dict(temperature=temperature,
                ece_before=expected_calibration_error(logits.softmax(1), labels),
                ece_after=expected_calibration_error((logits / temperature).softmax(1), labels),
                nll_before=float(F.cross_entropy(logits, labels)),
                nll_after=float(F.cross_entropy(logits / temperature, labels)))
