"""HunyuanVideo causal 3D VAE as Open-Sora v2.0 runs it (`hunyuan_vae`; design/opensora-v2.0.md section 4).

Pixels [B,3,F,H,W] in [-1,1], F = 4k+1  <->  latents [B,16,(F-1)/4+1,H/8,W/8], normalised as the MMDiT sees
them: z = scale_factor * (posterior - shift_factor). Time is causal: every convolution pads the past by
repeating the first frame, strided convolutions keep frame 0 alone, upsampling doubles every frame but the
first, and the mid-block attention only looks at the same or earlier frames. So frame 0 is encoded alone and
an image is one latent frame. (GroupNorm statistics still span all frames of a tile: not causal there.)

`encode_moments` and `decode_tile` are the fixed per-tile computations (no data-dependent Python: what gets
exported); `encode` / `decode` add Open-Sora's tiling loops (osx/vae_tiling.py, torch-free, shared with the
runtime): overlapping spatial tiles blended linearly, and optionally overlapping temporal tiles. Module
names are the keys of the released `hunyuan_vae.safetensors`, which Open-Sora loads with strict=True (osx too:
export/checkpoint_v2.py `load_part`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from osx.errors import InputError
from osx.models_v2 import HunyuanVAEConfig
from osx.vae_tiling import tiled_decode, tiled_encode

# --- building blocks ----------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d that sees only the present and the past: k-1 copies of the first frame in front, none behind;
    H and W replicate-padded by k//2 on both sides (no zero padding anywhere)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        k = kernel_size
        self.padding = (k // 2, k // 2, k // 2, k // 2, k - 1, 0)  # F.pad order: W, H, T
        self.conv = nn.Conv3d(in_ch, out_ch, k, stride=stride)

    def forward(self, x):
        if self.conv.kernel_size[0] > 1:
            x = F.pad(x, self.padding, mode="replicate")
        return self.conv(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = CausalConv3d(in_ch, out_ch, 3)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = CausalConv3d(out_ch, out_ch, 3)
        self.conv_shortcut = CausalConv3d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


def frame_causal_mask(frames: int, tokens_per_frame: int, device) -> torch.Tensor:
    """[L, L] boolean, L = frames * tokens_per_frame in (f, h, w) order: query i may attend key j when j's
    frame is not later than i's. Built from frame indices (one comparison), not a Python loop over rows.
    Dense all the same: a 256 px tile of 129 frames has L = 33*32*32 = 33,792 tokens, a 1.1 GB mask.
    Truncating division (floor for these non-negative indices): `//` exports floor's sign fix-up, an Equal of
    two booleans, which TensorRT's parser rejects."""
    frame = torch.div(torch.arange(frames * tokens_per_frame, device=device), tokens_per_frame, rounding_mode="trunc")
    return frame[None, :] <= frame[:, None]


class MidAttention(nn.Module):
    """diffusers' single-head `Attention` block over all T*H*W positions: GroupNorm, q/k/v, frame-causal
    softmax(q k^T / sqrt(C)), output projection, residual."""

    def __init__(self, ch: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=eps)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' to_out.1 is a parameter-free dropout

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, T*H*W, C], same statistics as GN on [B,C,L]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head: 4D for ONNX
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=frame_causal_mask(t, h * w, x.device)).squeeze(1)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, t, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, eps: float, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups, eps), ResnetBlock(ch, ch, groups, eps)])
        self.attentions = nn.ModuleList([MidAttention(ch, groups, eps)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Strided causal conv: stride (2,2,2) maps T -> (T-1)//2 + 1, so frame 0 stays alone."""

    def __init__(self, ch: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(ch, ch, 3, stride=stride)

    def forward(self, x):
        return self.conv(x)


def repeat2(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Nearest-neighbour 2x along `dim` (every slice twice), written as expand + reshape for export."""
    sizes = list(x.shape)
    sizes.insert(dim + 1, 2)
    return x.unsqueeze(dim + 1).expand(sizes).flatten(dim, dim + 1)


class Upsample(nn.Module):
    """Nearest 2x in H and W; with `time` also 2x in T for every frame but the first (T -> 2T-1); then a
    causal conv."""

    def __init__(self, ch: int, time: bool):
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(ch, ch, 3)

    def forward(self, x):
        x = repeat2(repeat2(x, 3), 4)
        if self.time:
            x = torch.cat([x[:, :, :1], repeat2(x[:, :, 1:], 2)], dim=2)
        return self.conv(x)


def _level_plan(cfg: HunyuanVAEConfig) -> list[tuple[bool, bool]]:
    """(spatial, temporal) 2x resampling of each level, from the input side: spatial at the first log2(8)
    levels, temporal at the log2(4) levels before the last (Open-Sora's rule for time ratio 4)."""
    if cfg.time_compression_ratio != 4:
        raise ValueError(f"time_compression_ratio {cfg.time_compression_ratio}: only Open-Sora v2.0's 4 is built here")
    n = len(cfg.block_out_channels)
    n_space = cfg.spatial_compression_ratio.bit_length() - 1
    n_time = cfg.time_compression_ratio.bit_length() - 1
    return [(i < n_space, n - 1 - n_time <= i < n - 1) for i in range(n)]


# --- encoder and decoder -------------------------------------------------------------------------------------


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, space: bool, time: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers))
        stride = (2 if time else 1, 2 if space else 1, 2 if space else 1)
        self.downsamplers = nn.ModuleList([Downsample(out_ch, stride)] if space or time else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, space: bool, time: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers))
        assert space or not time, "temporal-only upsampling is not an Open-Sora configuration"
        self.upsamplers = nn.ModuleList([Upsample(out_ch, time)] if space else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        chs, g, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.in_channels, chs[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, eps, space, time)
            for i, (space, time) in enumerate(_level_plan(cfg))
        )
        self.mid_block = MidBlock(chs[-1], g, eps, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=eps)
        self.conv_out = CausalConv3d(chs[-1], 2 * cfg.latent_channels, 3)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        chs, g, eps = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.latent_channels, chs[0], 3)
        self.mid_block = MidBlock(chs[0], g, eps, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, g, eps, space, time)
            for i, (space, time) in enumerate(_level_plan(cfg))
        )
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=eps)
        self.conv_out = CausalConv3d(chs[-1], cfg.out_channels, 3)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --- the VAE ----------------------------------------------------------------------------------------------------


class HunyuanVideoVAE(nn.Module):
    """encode(video [B,3,4k+1,H,W] in [-1,1]) -> normalised latents [B,16,k+1,H/8,W/8]; decode the reverse."""

    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.use_spatial_tiling = cfg.use_spatial_tiling
        self.use_temporal_tiling = cfg.use_temporal_tiling

    # Per-tile computations: what gets exported.
    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels -> posterior mean and log-variance [B, 2*16, T_lat, H/8, W/8], not normalised."""
        return self.quant_conv(self.encoder(video))

    def decode_tile(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels. The un-normalisation and the 1x1x1 post-quant conv act per position,
        so applying them per tile equals Open-Sora's order (un-normalise the whole, then tile)."""
        z = latents / self.cfg.scale_factor + self.cfg.shift_factor
        return self.decoder(self.post_quant_conv(z))

    # Open-Sora's encode / decode with its tiling (eager only).
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The posterior mean, or with a seeded `generator` a posterior sample (mean + std * noise), normalised.
        Open-Sora samples by default, from the unseeded global RNG; the mean is the deterministic choice."""
        self._check(video, self.cfg.in_channels, "video", "frames must be 4k+1 (1, 5, ..., 129)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}", hint="pass torch.Generator().manual_seed(seed)")
        moments = tiled_encode(self.encode_moments, video, self.cfg, self.use_spatial_tiling, self.use_temporal_tiling, torch.cat)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=generator.device)
            z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.device)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B,16,T,h,w] -> pixels [B,3,4(T-1)+1,8h,8w] (not clamped)."""
        self._check(latents, self.cfg.latent_channels, "latents", None)
        return tiled_decode(self.decode_tile, latents, self.cfg, self.use_spatial_tiling, self.use_temporal_tiling, torch.cat)

    def _check(self, x: torch.Tensor, channels: int, what: str, frames_rule: str | None) -> None:
        c = self.cfg
        ok = x.dim() == 5 and x.shape[1] == channels
        if ok and frames_rule:
            ok = (x.shape[2] - 1) % c.time_compression_ratio == 0 and all(s % c.spatial_compression_ratio == 0 for s in x.shape[-2:])
        if not ok:
            rule = f"frames 4k+1 and H, W multiples of {c.spatial_compression_ratio}" if frames_rule else "any T, h, w"
            raise InputError(
                f"{what} of shape {list(x.shape)} do not fit the HunyuanVideo VAE",
                hint=f"expected [B, {channels}, T, H, W] with {rule}",
            )
