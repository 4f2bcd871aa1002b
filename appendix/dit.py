"""Diffusion transformer backbone [DiT, Peebles & Xie 2023], the alternative to the U-Net in [ZSI] App. J.

Patchify (a p×p strided convolution) + fixed 2-D sine-cosine position embedding, then `depth` transformer
blocks conditioned with adaLN-Zero: the timestep (and optional label) embedding c regresses per block a
shift, scale and gate for the attention and the MLP branch, with the regression layers zero-initialised
so every block starts as the identity. A final adaLN layer maps each token to p·p·2C values (ε and the
learned-variance v, as the U-Net), unpatchified to [N, 2C, H, W]. Same diffusion and guidance as the U-Net:
`train.py --arch dit`.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import timestep_embedding


def sincos_pos_embed(dim, grid):
    """[grid², dim] fixed embedding: half the channels encode the row, half the column (sin, cos)."""
    pos = torch.arange(grid, dtype=torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    out = pos[:, None] * omega[None]                                   # [grid, dim/4]
    emb1d = torch.cat([torch.sin(out), torch.cos(out)], dim=1)         # [grid, dim/2]
    rows = emb1d[:, None, :].expand(grid, grid, dim // 2)
    cols = emb1d[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim).float()


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"),
                                 nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def attention(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attention(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


@dataclass
class DiTConfig:
    """Constructor arguments of the DiT; saved next to every checkpoint."""
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 2
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    num_classes: int = 0                     # > 0: class-conditional (the last label is the null label ∅)

    def build(self):
        return DiT(**asdict(self))


class DiT(nn.Module):
    def __init__(self, image_size=32, in_channels=3, patch_size=2, hidden_size=128, depth=4, num_heads=4,
                 mlp_ratio=4.0, learn_sigma=True, num_classes=0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"DiT: image size {image_size} is not divisible by the patch size {patch_size}")
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"DiT: hidden size {hidden_size} must be divisible by 4 and by num_heads {num_heads}")
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.hidden_size = num_classes, hidden_size
        self.grid = image_size // patch_size
        self.patchify = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, self.grid)[None], persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.label_emb = nn.Embedding(num_classes, hidden_size) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        for layer in (self.final_ada[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        w = self.patchify.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def unpatchify(self, x):
        """[N, grid², p·p·C] -> [N, C, H, W]."""
        n, p, g, c = x.shape[0], self.patch_size, self.grid, self.out_channels
        return x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * p, g * p)

    def forward(self, x, t, y=None):
        """Same contract as unet.UNet.forward: float32 [N, 2C, H, W]."""
        h = self.patchify(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.time_embed(timestep_embedding(t, 256))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes - 1, dtype=torch.long, device=x.device)
            c = c + self.label_emb(y)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        return self.unpatchify(self.final(modulate(self.final_norm(h), shift, scale))).float()
