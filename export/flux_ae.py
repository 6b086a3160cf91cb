"""The decoder of Flux.1's 2D autoencoder, which turns t2i2v's first-frame latent into pixels
(Open-Sora's `opensora/models/vae/autoencoder_2d.py` = BFL's `flux/modules/autoencoder.py`).

latent z [B, 16, H/8, W/8] (the MMDiT's normalised space) -> pixels [B, 3, H, W] in about [-1, 1], after
undoing Open-Sora's normalisation: z / scale_factor + shift_factor. Module names are BFL's, under
`decoder.`, so `flux1-dev-ae.safetensors` loads key for key once its `encoder.` half is dropped
(export/checkpoint_v2.py, part "flux_ae").
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from osx.models_v2 import FluxAEConfig


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), conv3x3(c_in, c_out)
        self.norm2, self.conv2 = group_norm(c_out), conv3x3(c_out, c_out)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """One-head self-attention over all pixels, 1x1-conv projections."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (p(h).flatten(2).transpose(1, 2)[:, None] for p in (self.q, self.k, self.v))  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = conv3x3(c, c)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """conv_in, mid (resnet, attention, resnet), `up[i]` from the deepest level (i = len(ch_mult)-1) down to
    0 with num_res_blocks + 1 resnets each and a 2x upsample on every level but 0, norm_out, conv_out."""

    def __init__(self, cfg: FluxAEConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv3x3(cfg.z_channels, c)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            c_out = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1))
            c = c_out
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)  # BFL's index: up.0 is the full-resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c)
        self.conv_out = conv3x3(c, cfg.out_ch)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxAEDecoder(nn.Module):
    """`forward(z [B, 16, h, w]) -> pixels [B, 3, 8h, 8w]`, z in the MMDiT's normalised latent space."""

    def __init__(self, cfg: FluxAEConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)
