"""Open-Sora v2.0 configurations (torch-free).

Read by every stage like osx/models.py: export builds torch modules from these, the planner estimates memory
from them, the manifest records them. Facts: shared/design/opensora-v2.0.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- MMDiT denoiser, T5 + CLIP text encoders, sampler ---------------------------------------------------

# --- HunyuanVideo causal 3D VAE ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HunyuanVAEConfig:
    """HunyuanVideo causal 3D VAE as Open-Sora v2.0 builds it (`AutoEncoder3DConfig` + the inference
    configs' `ae=`; design/opensora-v2.0.md section 4). Pixels [B,3,F,H,W], F = 4k+1, map to latents
    [B,16,(F-1)/4+1,H/8,W/8]; the encoder has `layers_per_block` resnets per level, the decoder one more."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    time_compression_ratio: int = 4  # the first frame is compressed alone: T_lat = (F-1)/4 + 1
    spatial_compression_ratio: int = 8
    mid_block_add_attention: bool = True
    scale_factor: float = 0.476986  # latents the MMDiT sees: scale_factor * (posterior - shift_factor)
    shift_factor: float = 0.0
    # Tiling at inference: square pixel tiles of `sample_size` (latent tiles of sample_size / 8), the
    # overlap blended linearly; temporal tiles of `sample_tsize` pixel frames (off in Open-Sora v2.0).
    sample_size: int = 256
    sample_tsize: int = 64
    tile_overlap_factor: float = 0.25
    use_spatial_tiling: bool = True
    use_temporal_tiling: bool = False

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.time_compression_ratio + 1

    @property
    def tile_latent_size(self) -> int:
        # Open-Sora divides by 2^(levels-1) (= the spatial ratio 8 at every shipped config).
        return int(self.sample_size / 2 ** (len(self.block_out_channels) - 1))

    @property
    def tile_latent_tsize(self) -> int:
        return self.sample_tsize // self.time_compression_ratio


HUNYUAN_VAE = HunyuanVAEConfig()

# Same structure (4 levels, 8x spatial / 4x temporal, mid-block attention, tiling on) with tiny widths
# and 64 px tiles, so a 96x96 px video is decoded as 2x2 overlapping tiles in about a second on a CPU.
HUNYUAN_VAE_TINY = HunyuanVAEConfig(
    block_out_channels=(8, 16, 32, 32),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=64,
    sample_tsize=16,
)
