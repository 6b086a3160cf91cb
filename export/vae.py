"""Open-Sora v1.2 video VAE (`OpenSoraVAE_V1_2`): a per-frame SD-VAE, then a causal temporal VAE.

Pixels [B,3,F,H,W] --spatial (8x, per frame)--> [B,4,F,H/8,W/8] --temporal (4x, causal)--> latents.
State-dict names follow the released checkpoint (`hpcai-tech/OpenSora-VAE-v1.2`): `spatial_vae.module.*`
is diffusers' AutoencoderKL (the implementation Open-Sora itself wraps), `temporal_vae.*` is
VAE_Temporal_SD (opensora/models/vae/vae_temporal.py, v1.2.0) re-implemented here, `scale`/`shift`
are the per-channel latent normalisation buffers. Shared notes: design/open-sora-models.md section 1.4.

Video is cut into 17-frame micro chunks (5 latents each). `encode_chunk` / `decode_chunk` are the
fixed-shape per-chunk computations with no data-dependent Python, so each exports to ONNX on its own;
`encode` / `decode` are Open-Sora's chunk loops written over them, and the runtime repeats the decode
loop in NumPy over the exported chunk decoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL

from osx.errors import InputError
from osx.models import SpatialVAEConfig, TemporalVAEConfig, VAEConfig, latent_frames


def chunk_front_padding(frames: int, temporal_downsample: int = 4) -> int:
    """Zero frames the temporal VAE puts in front of a chunk of `frames` pixel frames (and the decoder
    drops again): up to the next multiple of the temporal downsampling. 17 -> 3, 16 -> 0, 1 -> 3."""
    return -frames % temporal_downsample


# --- temporal VAE (VAE_Temporal_SD) -------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d that only looks back in time: (k - stride) zero frames in front, none behind; space is
    zero-padded symmetrically so H and W are kept."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, time_stride: int = 1, bias: bool = True):
        super().__init__()
        k = kernel_size
        self.padding = (k // 2, k // 2, k // 2, k // 2, k - time_stride, 0)  # F.pad order: W, H, T
        self.conv = nn.Conv3d(in_ch, out_ch, k, stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x):
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch)
        self.conv1 = CausalConv3d(in_ch, out_ch, 3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups, out_ch)
        self.conv2 = CausalConv3d(out_ch, out_ch, 3, bias=False)
        # A 1x1x1 projection of the residual only where the width changes (MAGVIT-v2 style).
        self.conv3 = CausalConv3d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv3 is None else self.conv3(x))


def _res_stack(in_ch: int, out_ch: int, n: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n))


def depth_to_time(x: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, C*f, T, H, W] -> [B, C, T*f, H, W]; channel c*f + k becomes frame t*f + k."""
    x = x.unflatten(1, (-1, factor))  # B, C, f, T, H, W
    return x.transpose(2, 3).flatten(2, 3)


class TemporalEncoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        widths = [f * m for m in cfg.channel_multipliers]
        self.conv_in = CausalConv3d(cfg.in_out_channels, f, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()  # between levels: strided conv where time is halved
        prev = f
        for i, ch in enumerate(widths):
            self.block_res_blocks.append(_res_stack(prev, ch, n, g))
            prev = ch
            if i < len(widths) - 1:
                down = cfg.temporal_downsample[i]
                self.conv_blocks.append(CausalConv3d(ch, ch, 3, time_stride=2) if down else nn.Identity())
        self.res_blocks = _res_stack(prev, prev, n, g)
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_embed_dim, 1)  # mean and log-variance

    def forward(self, x):
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        widths = [f * m for m in cfg.channel_multipliers]
        self.temporal_upsample = cfg.temporal_downsample
        prev = widths[-1]
        self.conv1 = CausalConv3d(cfg.latent_embed_dim, prev, 3)
        self.res_blocks = _res_stack(prev, prev, n, g)
        # Levels run deepest first; lists are indexed by level like the encoder's (checkpoint names).
        level_blocks, level_convs = [None] * len(widths), [None] * (len(widths) - 1)
        for i in reversed(range(len(widths))):
            level_blocks[i] = _res_stack(prev, widths[i], n, g)
            prev = widths[i]
            if i > 0:  # upsampling conv: C -> 2C channels, then depth-to-space in time
                level_convs[i - 1] = CausalConv3d(prev, 2 * prev, 3) if cfg.temporal_downsample[i - 1] else nn.Identity()
        self.block_res_blocks = nn.ModuleList(level_blocks)
        self.conv_blocks = nn.ModuleList(level_convs)
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, cfg.in_out_channels, 3)

    def forward(self, z):
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0 and self.temporal_upsample[i - 1]:
                x = depth_to_time(self.conv_blocks[i - 1](x), 2)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """VAE_Temporal_SD: 4x causal compression in time, none in space."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        self.time_factor = 2 ** sum(cfg.temporal_downsample)
        self.embed_dim = cfg.embed_dim
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, cfg.latent_embed_dim, 1)
        self.decoder = TemporalDecoder(cfg)

    def encode(self, x):
        """Posterior mean of [B,4,f,h,w] -> [B,4,ceil(f/4),h,w]; f is first front-padded with zeros to a
        multiple of 4. The pad is shape arithmetic: torch.export keeps it symbolic, the TorchScript
        ONNX tracer would freeze it to the traced frame count."""
        x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % self.time_factor, 0))
        moments = self.quant_conv(self.encoder(x))
        return moments[:, : self.embed_dim]

    def decode(self, z):
        """[B,4,t,h,w] -> [B,4,4t,h,w], front padding still included (the caller drops it)."""
        return self.decoder(self.post_quant_conv(z))


# --- spatial VAE (SD-VAE through diffusers, applied per frame) --------------------------------------


class SpatialVAE(nn.Module):
    """Open-Sora's VideoAutoencoderKL: AutoencoderKL over every frame; latents times `scaling_factor`."""

    def __init__(self, cfg: SpatialVAEConfig):
        super().__init__()
        levels = len(cfg.block_out_channels)
        self.module = AutoencoderKL(
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels,
            norm_num_groups=cfg.norm_num_groups,
            scaling_factor=cfg.scaling_factor,
        )
        self.scaling_factor = cfg.scaling_factor

    @staticmethod
    def _per_frame(fn, x: torch.Tensor, micro_batch_size: int | None) -> torch.Tensor:
        """Apply a 2D fn to every frame of [B,C,T,H,W]; optionally a few frames per call (memory only:
        frames are independent, so the result does not depend on the micro batch)."""
        frames = x.transpose(1, 2).flatten(0, 1)  # (B T) C H W
        if micro_batch_size is None:
            out = fn(frames)
        else:
            out = torch.cat([fn(f) for f in frames.split(micro_batch_size)])
        return out.unflatten(0, (x.shape[0], -1)).transpose(1, 2)

    def encode(self, x, micro_batch_size: int | None = None):
        mean = lambda f: self.module.encode(f).latent_dist.mean  # posterior mean: deterministic
        return self._per_frame(mean, x, micro_batch_size) * self.scaling_factor

    def decode(self, z, micro_batch_size: int | None = None):
        decode = lambda f: self.module.decode(f, return_dict=False)[0]
        return self._per_frame(decode, z / self.scaling_factor, micro_batch_size)


# --- the whole VAE ----------------------------------------------------------------------------------


class VideoAutoencoder(nn.Module):
    """OpenSoraVAE_V1_2. Latents in and out are model-normalised: z_model = (z - shift) / scale."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial_vae = SpatialVAE(cfg.spatial)
        self.temporal_vae = TemporalVAE(cfg.temporal)
        self.register_buffer("scale", torch.tensor(cfg.scale, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(cfg.shift, dtype=torch.float32).view(1, -1, 1, 1, 1))

    # Fixed-shape per-chunk computations: what gets exported.
    def encode_chunk(self, x: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor:
        """Pixels [B,3,f<=17,H,W] in [-1,1] -> model-normalised posterior mean [B,4,ceil(f/4),H/8,W/8]."""
        z = self.temporal_vae.encode(self.spatial_vae.encode(x, micro_batch_size))
        return (z - self.shift) / self.scale

    def decode_chunk(self, z: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor:
        """Model-normalised latents [B,4,t<=5,h,w] -> pixels [B,3,4t,8h,8w], front padding NOT dropped."""
        x = self.temporal_vae.decode(z * self.scale + self.shift)
        return self.spatial_vae.decode(x, micro_batch_size)

    # Open-Sora's chunk loops (eager only).
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[B,3,F,H,W] -> [B,4,T_lat,H/8,W/8]; every 17 pixel frames become 5 latent frames."""
        step, mb = self.cfg.micro_frame_size, self.cfg.spatial.micro_batch_size
        return torch.cat([self.encode_chunk(x[:, :, i : i + step], mb) for i in range(0, x.shape[2], step)], dim=2)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[B,4,T_lat,h,w] -> [B,3,num_frames,8h,8w]: each 5-latent chunk decodes to min(17, remaining)
        frames after dropping its front padding."""
        if latent_frames(num_frames, self.cfg) != z.shape[2]:
            raise InputError(
                f"{z.shape[2]} latent frames cannot decode to {num_frames} frames",
                hint=f"{num_frames} frames have {latent_frames(num_frames, self.cfg)} latent frames",
            )
        step, mb = self.cfg.micro_z_frame_size, self.cfg.spatial.micro_batch_size
        chunks = []
        for k, start in enumerate(range(0, z.shape[2], step)):
            frames = min(self.cfg.micro_frame_size, num_frames - k * self.cfg.micro_frame_size)
            video = self.decode_chunk(z[:, :, start : start + step], mb)
            chunks.append(video[:, :, chunk_front_padding(frames, self.cfg.temporal_downsample) :])
        return torch.cat(chunks, dim=2)

