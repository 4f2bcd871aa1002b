"""Attention U-Net of [IDDPM] / [ADM], the ε and v network of every [ZSI] experiment (App. C; docs/paper_notes.md §2.1).

  stem conv -> per level: num_res_blocks ResBlocks (+ self-attention at `attention_resolutions`), downsample
  -> middle: ResBlock, attention, ResBlock
  -> decoder mirror with skip concatenation, num_res_blocks + 1 ResBlocks per level
  -> GroupNorm, SiLU, zero-initialised conv to out_channels (2C with learned sigma: ε̂ then v).

ResBlocks take the timestep embedding (sinusoid of the *raw* integer t, cos first, then a 2-layer MLP) with
scale-shift norm, GN(h)(1 + scale) + shift [ADM sec. 3]. GroupNorm(32) always computes in fp32 and attention
uses PyTorch's fused scaled-dot-product kernel (fp32 softmax accumulation), so the bf16/fp16 autocast of
`device.autocast()` touches only the convolutions and matmuls: the precision islands of improved-diffusion
without its hand-rolled fp16 master weights. With `--preset paper` this file builds the paper's
121,063,942-parameter model (a test checks the count).

The building blocks (ResBlock, AttentionBlock, the encoder half) are shared with the noisy classifier
in classifier.py.
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half) (cos first, as guided-diffusion)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def zero_module(module):
    """Zero-initialise a layer so that a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the autocast dtype (an fp16/bf16 precision island)."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


def normalization(channels):
    """GroupNorm with 32 groups as [IDDPM] for layers of >= 64 channels (every layer of the paper's models).

    Narrow layers (the CPU preset) get groups of 4 channels instead: with one channel per group GroupNorm
    becomes InstanceNorm and erases each feature's spatial mean, and the network then cannot tell the
    background colour apart from noise (measured: coloured backgrounds in every sample).
    """
    groups = 32 if channels >= 64 and channels % 32 == 0 else math.gcd(32, max(1, channels // 4))
    return GroupNorm32(groups, channels)


class Downsample(nn.Module):
    """Halve the resolution: stride-2 3×3 conv, or 2×2 average pooling when use_conv=False."""

    def __init__(self, channels, use_conv=True, out_channels=None):
        super().__init__()
        out_channels = out_channels or channels
        self.op = (nn.Conv2d(channels, out_channels, 3, stride=2, padding=1) if use_conv
                   else nn.AvgPool2d(2))

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3×3 conv when use_conv."""

    def __init__(self, channels, use_conv=True, out_channels=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding; optionally resamples (resblock_updown)."""

    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None, use_scale_shift_norm=True,
                 up=False, down=False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample = (Upsample(channels, False) if up else Downsample(channels, False) if down else None)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_norm = normalization(out_channels)
        self.out_rest = nn.Sequential(nn.SiLU(), nn.Dropout(dropout),
                                      zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        return self.skip(x) + self.out_rest(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, residual, output projection zero-initialised."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else max(1, channels // num_head_channels)
        assert channels % self.num_heads == 0, f"{channels} channels do not split into {self.num_heads} heads"
        self.norm = normalization(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x, emb=None):
        b, c, hh, ww = x.shape
        h = self.norm(x).reshape(b, c, hh * ww).transpose(1, 2)                 # (B, HW, C)
        q, k, v = self.qkv(h).reshape(b, hh * ww, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v)                             # (B, heads, HW, C/heads)
        h = self.proj_out(h.transpose(1, 2).reshape(b, hh * ww, c))
        return x + h.transpose(1, 2).reshape(b, c, hh, ww)


class EmbedSequential(nn.Sequential):
    """A sequence of layers where ResBlocks (and attention) also receive the timestep embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


def time_mlp(model_channels):
    """Sinusoid dim model_channels -> 4·model_channels, SiLU, 4·model_channels [IDDPM]."""
    d = 4 * model_channels
    return nn.Sequential(nn.Linear(model_channels, d), nn.SiLU(), nn.Linear(d, d))


def build_encoder(image_size, in_channels, model_channels, num_res_blocks, attention_resolutions,
                  channel_mult, num_heads, num_head_channels, dropout, use_scale_shift_norm, resblock_updown):
    """The down half and the middle block shared by the U-Net and the noisy classifier.

    Returns (input_blocks, middle_block, skip_channels, channels_at_bottom, bottom_resolution).
    """
    downsampling = 2 ** (len(channel_mult) - 1)
    if image_size % downsampling:
        raise ValueError(f"image size {image_size} is not divisible by {downsampling}, the total "
                         f"downsampling of channel_mult={tuple(channel_mult)}")
    emb = 4 * model_channels
    attn = lambda ch: AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels)
    ch = int(channel_mult[0] * model_channels)
    blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
    skip_channels, res = [ch], image_size
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [ResBlock(ch, emb, dropout, int(mult * model_channels), use_scale_shift_norm)]
            ch = int(mult * model_channels)
            if res in attention_resolutions:
                layers.append(attn(ch))
            blocks.append(EmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(channel_mult) - 1:
            blocks.append(EmbedSequential(
                ResBlock(ch, emb, dropout, ch, use_scale_shift_norm, down=True) if resblock_updown
                else Downsample(ch, True)))
            skip_channels.append(ch)
            res //= 2
    middle = EmbedSequential(ResBlock(ch, emb, dropout, ch, use_scale_shift_norm), attn(ch),
                             ResBlock(ch, emb, dropout, ch, use_scale_shift_norm))
    return blocks, middle, skip_channels, ch, res


@dataclass
class UNetConfig:
    """Constructor arguments of UNet, with the names of the paper's code; saved next to every checkpoint."""
    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 6                       # 2C: ε̂ and v (learned sigma)
    num_res_blocks: int = 3
    attention_resolutions: tuple = (16, 8)      # feature-map sizes with self-attention (+ the middle block)
    channel_mult: tuple = (1, 2, 3, 4)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    num_classes: int = 0                        # > 0: class-conditional (classifier-free guidance, App. J)

    def build(self):
        return UNet(**asdict(self))


class UNet(nn.Module):
    def __init__(self, image_size=64, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
                 attention_resolutions=(16, 8), channel_mult=(1, 2, 3, 4), num_heads=4, num_head_channels=-1,
                 dropout=0.0, use_scale_shift_norm=True, resblock_updown=False, num_classes=0):
        super().__init__()
        self.image_size, self.in_channels = image_size, in_channels
        self.model_channels, self.num_classes = model_channels, num_classes
        emb = 4 * model_channels
        self.time_embed = time_mlp(model_channels)
        self.label_emb = nn.Embedding(num_classes, emb) if num_classes else None
        self.input_blocks, self.middle_block, skips, ch, res = build_encoder(
            image_size, in_channels, model_channels, num_res_blocks, attention_resolutions, channel_mult,
            num_heads, num_head_channels, dropout, use_scale_shift_norm, resblock_updown)
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                out_ch = int(mult * model_channels)
                layers = [ResBlock(ch + skips.pop(), emb, dropout, out_ch, use_scale_shift_norm)]
                ch = out_ch
                if res in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads=num_heads, num_head_channels=num_head_channels))
                if level and i == num_res_blocks:
                    layers.append(ResBlock(ch, emb, dropout, ch, use_scale_shift_norm, up=True)
                                  if resblock_updown else Upsample(ch, True))
                    res *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x, t, y=None):
        """x: [N, C, H, W] in [-1, 1]; t: [N] integer timesteps; y: [N] labels (class-conditional only; None =
        the last label, which classifier-free training uses as the null label ∅).

        Returns float32 [N, out_channels, H, W] whatever the autocast dtype.
        """
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes - 1, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(y)
        h, hs = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop().to(h.dtype)], dim=1), emb)
        return self.out(h).float()


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
