"""Gaussian diffusion: forward process, learned-variance reverse process, hybrid loss, samplers.

Implements [ZSI] App. A, which follows [DDPM] and [IDDPM]:
  cosine schedule               [IDDPM eq. 17]   = [ZSI eq. 10]   -> cosine_betas
  q(x_t | x_0)                  [DDPM eq. 4]                      -> GaussianDiffusion.q_sample
  q(x_{t-1} | x_t, x_0)         [DDPM eq. 6-7]   (ZSI eq. 5 is mistyped) -> GaussianDiffusion.q_posterior_mean_variance
  learned-range variance        [IDDPM eq. 15]                    -> GaussianDiffusion.p_mean_variance
  L_hybrid = L_simple + λ L_vlb [IDDPM eq. 16]                    -> GaussianDiffusion.training_losses
  L_vlb alone (App. J)          [IDDPM eq. 4-6]                   -> training_losses, loss_type="vlb"
  linear schedule (App. J)      [DDPM sec. 4]                     -> linear_betas
  ancestral sampling            [DDPM Alg. 2]                     -> GaussianDiffusion.p_sample_loop
  classifier guidance           [ADM Alg. 1], [ZSI Sec. 2.2, eq. 2] -> GaussianDiffusion.condition_mean
  DDIM                          [DDIM eq. 12]                     -> GaussianDiffusion.ddim_sample_loop
  respacing                     [IDDPM sec. 4]                    -> GaussianDiffusion.respace

Symbol -> attribute (index 0 is the paper's t = 1, as in the official code):
  β_t -> betas        α_t -> alphas          ᾱ_t -> alphas_cumprod     ᾱ_{t-1} -> alphas_cumprod_prev
  β̃_t -> posterior_variance   log β̃_t (β̃_0 replaced by β̃_1) -> posterior_log_variance_clipped
  T   -> num_timesteps    kept original indices after respacing -> timestep_map

Schedules are computed in float64 (numpy) and gathered into float32 tensors, exactly like
improved-diffusion. Networks always receive the *original* integer timestep (0..T-1, no rescaling),
also after respacing, so a classifier trained on the full chain guides a respaced sampler.

Guidance semantics (docs/paper_notes.md §1.7): ancestral sampling shifts the mean, μ' = μ + Σ ⊙ g, where
g = cond_fn(x_t, t) is the gradient of the weighted class log-probabilities *at x_t* (guided-diffusion's
choice; [ZSI] Sec. 2.2 writes the gradient at μ: `guide_at="mean"`). DDIM uses the score form
ε' = ε - sqrt(1-ᾱ_t) g.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------

def cosine_betas(num_timesteps, s=0.008, max_beta=0.999):
    """[IDDPM eq. 17]: ᾱ(u) = cos²((u + s)/(1 + s) · π/2), β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta)."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def linear_betas(num_timesteps):
    """[DDPM sec. 4] linear schedule, β rising linearly from 1e-4 to 0.02 over T = 1000 steps, rescaled for any T
    as improved-diffusion's "linear" schedule: β_i = s·1e-4 + i·s·(0.02 - 1e-4)/(T-1), s = 1000/T, i = 0..T-1
    (T = 4000: 2.5e-5 .. 5e-3). [ZSI] App. J: interpolation occurs with it too. Float64 [T].
    Raises ValueError for T <= 20, where the last β = 20/T would reach 1 or more.
    """
    if num_timesteps <= 20:
        raise ValueError(f"the linear schedule needs T > 20 (its last β is 20/T), got T = {num_timesteps}")
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps, spec):
    """The sorted original indices kept when respacing [IDDPM sec. 4], as improved-diffusion's `space_timesteps`
    (improved_diffusion/respace.py) keeps them.

    spec: an int K or "K" (one section), "a,b,c" (T split into equal sections, the first T mod n one step
    longer, each with its own count) or "ddimK" (the smallest integer stride giving exactly K steps).
    A section of `size` steps with count c > 1 keeps start + round(x_j), x_0 = 0, x_{j+1} = x_j + (size-1)/(c-1),
    the fractional stride *accumulated* in float64 and rounded half to even, as the reference does: round(j·stride)
    differs from it at rounding ties (e.g. T = 1000, K = 21). A section with c = 1 keeps its first step.
    One deliberate difference: K = 1 for the whole chain keeps T-1 (one step from pure noise to x_0, whose sample
    is the clipped x̂_0), where the reference keeps 0: a chain starting at almost clean data, which its
    GaussianDiffusion cannot even build (β̃_1 is missing). Every other spec gives the reference's indices.
    """
    spec = str(spec)
    if spec.startswith("ddim"):
        k = int(spec[len("ddim"):])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == k:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make {k} evenly strided steps out of {num_timesteps}")
    counts = [int(c) for c in spec.split(",")]
    if counts == [1]:
        return [num_timesteps - 1]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        x = np.add.accumulate(np.r_[0.0, np.full(count - 1, stride)])   # sequential float64 sums, as x += stride
        kept += (start + np.rint(x).astype(np.int64)).tolist()           # rint: half to even, as Python's round
        start += size
    return sorted(set(kept))


# ---------------------------------------------------------------------------------------------------
# Gaussian helpers (pure functions)
# ---------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) ≈ ½(1 + tanh(sqrt(2/π)(x + 0.044715 x³))), the approximation improved-diffusion uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log p(x) of data on the 256-level grid of [-1, 1] under N(means, e^(2 log_scales)) [DDPM sec. 3.3].

    Each pixel value owns the bin [x - 1/255, x + 1/255]; the edge bins extend to ±∞. Nats, elementwise.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------------
# The diffusion
# ---------------------------------------------------------------------------------------------------

SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}
LOSS_TYPES = ("hybrid", "vlb")


@dataclass
class DiffusionConfig:
    """Everything needed to rebuild a GaussianDiffusion; saved next to every checkpoint."""
    diffusion_steps: int = 4000  # T [ZSI App. C]
    schedule: str = "cosine"     # "cosine" [IDDPM] (every paper run) or "linear" [DDPM]
    learn_sigma: bool = True     # learned-range variance + hybrid loss [IDDPM]; False: fixed β_t
    sigma_small: bool = False    # with learn_sigma=False: β̃_t instead of β_t
    vb_scale: float = 1.0        # 1 = official configs (rescale_learned_sigmas: false); T/1000 = paper's λ=0.001
    loss_type: str = "hybrid"    # "hybrid" L_simple + vb_scale·L_t (every paper run); "vlb": T·L_t alone (App. J)

    def build(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        return GaussianDiffusion(SCHEDULES[self.schedule](self.diffusion_steps), learn_sigma=self.learn_sigma,
                                 sigma_small=self.sigma_small, vb_scale=self.vb_scale, loss_type=self.loss_type)


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion with T = len(betas) steps.

    The model is any callable `model(x_t, t, **model_kwargs) -> tensor` with 2C channels when
    `learn_sigma` (ε̂ then v) and C channels otherwise; t is the original integer timestep.
    """

    def __init__(self, betas, learn_sigma=True, sigma_small=False, vb_scale=1.0, timestep_map=None,
                 loss_type="hybrid"):
        betas = np.asarray(betas, dtype=np.float64)
        assert betas.ndim == 1 and (betas > 0).all() and (betas <= 1).all(), "betas must lie in (0, 1]"
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.learn_sigma, self.sigma_small, self.vb_scale = learn_sigma, sigma_small, vb_scale
        self.loss_type = loss_type
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)

        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) [DDPM eq. 7]
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0, so its log is replaced by log β̃_1 (improved-diffusion's clipping). A one-step chain
        # (respaced K = 1) has no β̃_1: β_0 stands in. Index 0 adds no noise, so no sample depends on it.
        self.posterior_variance_1 = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance_1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas)
                                     / (1.0 - self.alphas_cumprod))

    # ----- bookkeeping -----
    def _extract(self, arr, t, x):
        """arr[t] as float32, shaped to broadcast against x. t: int64 tensor of shape [N]."""
        out = torch.from_numpy(arr)[t.cpu()].to(device=x.device, dtype=torch.float32)  # move N values, not T
        return out.view(-1, *([1] * (x.ndim - 1)))

    def _call(self, fn, x, t, **kwargs):
        """Call a network (or cond_fn) with the original timesteps of this (maybe respaced) chain."""
        t_orig = torch.from_numpy(self.timestep_map)[t.cpu()].to(t.device)
        return fn(x, t_orig, **kwargs)

    def respace(self, spec):
        """A chain using only the kept steps of `space_timesteps(T, spec)` [IDDPM sec. 4].

        New betas are recomputed so that the respaced ᾱ'_j equals the original ᾱ at the kept index k_j
        (β' is not re-clipped); `timestep_map` maps j back to k_j for every network call.
        """
        kept = space_timesteps(self.num_timesteps, spec)
        betas, last = [], 1.0
        for k in kept:
            betas.append(1.0 - self.alphas_cumprod[k] / last)
            last = self.alphas_cumprod[k]
        return GaussianDiffusion(np.array(betas), learn_sigma=self.learn_sigma, sigma_small=self.sigma_small,
                         vb_scale=self.vb_scale, timestep_map=self.timestep_map[kept], loss_type=self.loss_type)

    # ----- forward process -----
    def q_sample(self, x0, t, noise=None):
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε  [DDPM eq. 4]."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) [DDPM eq. 6-7]."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x0
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._extract(self.posterior_variance, t, x_t),
                self._extract(self.posterior_log_variance_clipped, t, x_t))

    def predict_x0_from_eps(self, x_t, t, eps):
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_x0(self, x_t, t, x0):
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ----- reverse process -----
    def p_mean_variance(self, model, x_t, t, clip_denoised=True, model_kwargs=None, model_output=None):
        """p(x_{t-1} | x_t) from the network output [ZSI eq. 7-8], [IDDPM eq. 15].

        The network predicts ε̂ and, with learn_sigma, v: log Σ = (v+1)/2 · log β_t + (1-v)/2 · log β̃_t
        (v is not clamped). μ is the posterior mean at x̂_0 = x̂_0(x_t, ε̂), clamped to [-1, 1] when
        clip_denoised. Returns dict(mean, variance, log_variance, pred_x0, eps).
        """
        out = self._call(model, x_t, t, **(model_kwargs or {})) if model_output is None else model_output
        c = x_t.shape[1]
        if self.learn_sigma:
            assert out.shape[1] == 2 * c, f"learn_sigma needs {2 * c} output channels, got {out.shape[1]}"
            eps, v = out[:, :c], out[:, c:]
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(np.log(self.betas), t, x_t)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = out
            if self.sigma_small:
                var, log_var = self.posterior_variance, self.posterior_log_variance_clipped
            else:  # β_t, with β_0 replaced by β̃_1 so that the decoder's variance is not too large
                var = np.append(self.posterior_variance_1, self.betas[1:])
                log_var = np.log(var)
            variance = self._extract(var, t, x_t).expand_as(x_t)
            log_variance = self._extract(log_var, t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, eps=eps)

    # ----- training -----
    def training_losses(self, model, x0, t, noise=None, model_kwargs=None):
        """Per-example training loss at timesteps t [N] for x0 [N, C, H, W]. Returns dict(loss, mse, vb), each [N].

        mse: mean over pixels of (ε - ε̂)². vb: the single-step term L_t of L_vlb in bits/dim,
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the discretized-Gaussian decoder NLL at t = 0.

        loss_type "hybrid": L_hybrid = L_simple + vb_scale · L_t [IDDPM eq. 16]. vb sees ε̂ through a
        stop-gradient, so it trains only the variance and L_simple alone drives the mean ([IDDPM sec. 3.1]: the
        vlb term is too noisy to train the mean). The official configs add vb unscaled (vb_scale=1: weight 1/T on
        the full L_vlb, since L_vlb ≈ T·L_t); the paper text's λ = 0.001 is vb_scale = T/1000. With fixed
        variance (learn_sigma=False) vb is 0 and the loss is L_simple [DDPM eq. 14].
        loss_type "vlb" ([ZSI] App. J: it "did not fit the training distribution well"): loss = T · L_t with no
        stop-gradient, so L_vlb trains the mean and the (learned) variance; t ~ U{0..T-1} makes T·L_t an unbiased
        one-sample estimate of L_vlb - L_T [IDDPM eq. 4-6] in bits/dim (improved-diffusion's RESCALED_KL, what
        the official code's use_kl selects). mse is then only reported (detached); vb_scale is not used.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = self._call(model, x_t, t, **(model_kwargs or {})).float()
        c = x0.shape[1]
        mse = mean_flat((noise - out[:, :c]) ** 2)
        if self.loss_type == "vlb":
            vb = self.vb_terms_bpd(x0, x_t, t, model_output=out)
            return dict(loss=self.num_timesteps * vb, mse=mse.detach(), vb=vb)
        if not self.learn_sigma:
            vb = torch.zeros_like(mse)
        else:
            frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
            vb = self.vb_terms_bpd(x0, x_t, t, model_output=frozen)
        return dict(loss=mse + self.vb_scale * vb, mse=mse, vb=vb)

    def vb_terms_bpd(self, x0, x_t, t, model=None, model_output=None, clip_denoised=False):
        """L_t in bits per dimension: KL for t > 0, decoder NLL for t = 0 [IDDPM eq. 4-6]."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ----- ancestral sampling -----
    def condition_mean(self, cond_fn, out, x_t, t, guide_at="x_t"):
        """The guided mean μ + Σ ⊙ g with g = cond_fn(x_t, t) = ∇_{x_t} Σ_m λ_m log p(y_m | x_t, t)
        [ADM Alg. 1], [ZSI Sec. 2.2] with eq. 2's sum of scores (guided-diffusion's `condition_mean`).

        guide_at="mean": g at μ instead, as [ZSI] Sec. 2.2 writes it, with the timestep of x_{t-1} (the expansion
        of log p(y | x_{t-1}) around its mean μ [ADM sec. 4.1]; index 0 at the last step).
        """
        at, t_at = (out["mean"], (t - 1).clamp(min=0)) if guide_at == "mean" else (x_t, t)
        return out["mean"] + out["variance"] * self._call(cond_fn, at, t_at).float()

    def p_sample(self, model, x_t, t, cond_fn=None, clip_denoised=True, model_kwargs=None, noise=None,
                 guide_at="x_t"):
        """One step x_t -> x_{t-1} [DDPM Alg. 2 line 4], guided by cond_fn [ADM Alg. 1].

        Returns dict(sample, pred_x0), each [N, C, H, W].
        """
        # 1. p(x_{t-1} | x_t) = N(μ_θ, Σ_θ) from the network's ε̂ and v [ZSI eq. 7-8], [IDDPM eq. 15]
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        # 2. (multi-)guidance shifts the mean: μ + Σ ⊙ ∇ log p(y | x_t) [ADM Alg. 1], [ZSI Sec. 2.2, eq. 2]
        mean = out["mean"] if cond_fn is None else self.condition_mean(cond_fn, out, x_t, t, guide_at)
        # 3. x_{t-1} = μ + σ z, no noise at the last step (t = 0)
        noise = torch.randn_like(x_t) if noise is None else noise
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        return dict(sample=mean + nonzero * torch.exp(0.5 * out["log_variance"]) * noise,
                    pred_x0=out["pred_x0"])

    def _indices(self, t_start, progress):
        steps = list(range(self.num_timesteps if t_start is None else t_start + 1))[::-1]
        if progress is True:
            from tqdm.auto import tqdm
            return tqdm(steps, desc="sampling", unit="step", leave=False)
        return steps

    def p_sample_loop(self, model, shape, noise=None, cond_fn=None, clip_denoised=True, model_kwargs=None,
                      progress=False, device=None, generator=None, guide_at="x_t"):
        """Sample x_0 by running p_sample from x_{T-1} ~ N(0, I) down to index 0 [DDPM Alg. 2], guided by cond_fn
        [ADM Alg. 1]. generator: an optional torch.Generator for reproducible noise (CPU generators only).
        Returns [N, C, H, W] = shape."""
        device = device or (noise.device if noise is not None else "cpu")
        randn = lambda: torch.randn(*shape, generator=generator).to(device)
        x = randn() if noise is None else noise
        for i in self._indices(None, progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                x = self.p_sample(model, x, t, cond_fn=cond_fn, clip_denoised=clip_denoised,
                                  model_kwargs=model_kwargs, noise=randn() if i > 0 else None,
                                  guide_at=guide_at)["sample"]
        return x

    # ----- DDIM -----
    def condition_score(self, cond_fn, out, x_t, t):
        """Guidance in score form for DDIM [ADM eq. 14]: ε' = ε̂ - sqrt(1-ᾱ_t) g; x̂_0 re-derived (no re-clip)."""
        eps = self.predict_eps_from_x0(x_t, t, out["pred_x0"])
        eps = eps - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * self._call(cond_fn, x_t, t).float()
        return self.predict_x0_from_eps(x_t, t, eps)

    def ddim_sample(self, model, x_t, t, cond_fn=None, eta=0.0, clip_denoised=True, model_kwargs=None,
                    noise=None):
        """One DDIM step [DDIM eq. 12]; σ_t = η sqrt((1-ᾱ_{t-1})/(1-ᾱ_t)) sqrt(1-ᾱ_t/ᾱ_{t-1}) [DDIM eq. 16]."""
        # 1. x̂_0 and ε̂ from the network [DDIM eq. 12, "predicted x_0"]
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        # 2. guidance in score form: ε' = ε̂ - sqrt(1-ᾱ_t) g [ADM eq. 14]
        pred_x0 = out["pred_x0"] if cond_fn is None else self.condition_score(cond_fn, out, x_t, t)
        eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        # 3. σ_t(η) [DDIM eq. 16]
        a_bar = self._extract(self.alphas_cumprod, t, x_t)
        a_bar_prev = self._extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
        # 4. x_{t-1} = sqrt(ᾱ_{t-1}) x̂_0 + sqrt(1-ᾱ_{t-1}-σ²) ε' + σ z [DDIM eq. 12]
        mean = pred_x0 * torch.sqrt(a_bar_prev) + torch.sqrt((1 - a_bar_prev - sigma ** 2).clamp(min=0)) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        if noise is None:
            noise = torch.randn_like(x_t)
        return dict(sample=mean + nonzero * sigma * noise, pred_x0=pred_x0)

    def ddim_reverse_sample(self, model, x_t, t, clip_denoised=False, model_kwargs=None):
        """Deterministic DDIM inversion x_t -> x_{t+1} (η = 0)."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_x0(x_t, t, out["pred_x0"])
        a_bar_next = self._extract(self.alphas_cumprod_next, t, x_t)
        return out["pred_x0"] * torch.sqrt(a_bar_next) + torch.sqrt(1 - a_bar_next) * eps

    def ddim_sample_loop(self, model, shape, noise=None, cond_fn=None, eta=0.0, clip_denoised=True,
                         model_kwargs=None, progress=False, device=None, generator=None, t_start=None):
        """DDIM from index t_start (default T-1) down to 0, starting at `noise`.

        eta: a float, or a function of the (respaced) index giving a per-step η_t ([ZSI App. N]).
        """
        device = device or (noise.device if noise is not None else "cpu")
        randn = lambda: torch.randn(*shape, generator=generator).to(device)
        x = randn() if noise is None else noise
        for i in self._indices(t_start, progress):
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            eta_i = eta(i) if callable(eta) else eta
            with torch.no_grad():
                x = self.ddim_sample(model, x, t, cond_fn=cond_fn, eta=eta_i, clip_denoised=clip_denoised,
                                     model_kwargs=model_kwargs, noise=randn() if eta_i > 0 else None)["sample"]
        return x

    def ddim_reverse_loop(self, model, x0, t_stop, clip_denoised=False, model_kwargs=None):
        """Invert x_0 deterministically to x at index t_stop (inclusive), running indices 0..t_stop-1."""
        x = x0
        for i in range(t_stop):
            t = torch.full((x0.shape[0],), i, dtype=torch.long, device=x0.device)
            with torch.no_grad():
                x = self.ddim_reverse_sample(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        return x
