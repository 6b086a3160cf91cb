"""Named model configurations (torch-free).

Every stage reads these: export builds torch modules from them, the component specs take their sizes,
the planner estimates memory from them, and the manifest records them so the runtime needs nothing else.
`opensora-v1.2` holds the released hyperparameters (shared/design/open-sora-models.md, section 1);
`opensora-v1.2-tiny` is the same architecture with tiny widths so the whole path runs on a CPU in seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from osx.errors import OsxError


@dataclass(frozen=True)
class TextEncoderConfig:
    """T5 v1.1 encoder (transformers' T5Config names)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    max_length: int = 300  # tokens; pad/truncate to exactly this
    pad_token_id: int = 0
    eos_token_id: int = 1


@dataclass(frozen=True)
class DenoiserConfig:
    """STDiT3 (Open-Sora v1.2)."""

    hidden_size: int = 1152
    depth: int = 28  # spatial blocks; as many temporal blocks again
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 4
    out_channels: int = 8  # pred_sigma: only the first `in_channels` are used
    caption_channels: int = 4096
    model_max_length: int = 300
    input_sq_size: int = 512
    qk_norm: bool = True
    rope_theta: float = 10000.0
    frequency_embedding_size: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class SpatialVAEConfig:
    """SD(XL)-VAE as diffusers' AutoencoderKL (keys `spatial_vae.module.*`)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # Open-Sora's code uses SD's factor, not SDXL's 0.13025
    micro_batch_size: int = 4


@dataclass(frozen=True)
class TemporalVAEConfig:
    """Causal temporal VAE (VAE_Temporal_SD, keys `temporal_vae.*`)."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32


@dataclass(frozen=True)
class VAEConfig:
    spatial: SpatialVAEConfig = field(default_factory=SpatialVAEConfig)
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    micro_frame_size: int = 17  # pixel frames per temporal chunk
    micro_z_frame_size: int = 5  # latent frames per chunk
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
    spatial_downsample: int = 8
    temporal_downsample: int = 4


@dataclass(frozen=True)
class SchedulerConfig:
    """Rectified flow sampler settings (configs/opensora-v1-2/inference/sample.py)."""

    num_sampling_steps: int = 30
    num_timesteps: int = 1000
    guidance_scale: float = 7.0
    use_timestep_transform: bool = True
    base_resolution: int = 512 * 512  # r = sqrt(H*W / base_resolution) * sqrt(T')
    aesthetic_score: float | None = 6.5
    fps: int = 24
    # The dtype Open-Sora's reference runs in (the family declares the default, osx.families): the denoiser sees
    # t, fps, height and width rounded to it and the schedule's size arithmetic is done in it. "bf16" is
    # Open-Sora's default inference; "fp32" reproduces an fp32 run.
    reference_dtype: str = "bf16"


IMAGE_FPS = 120  # Open-Sora conditions single images (num_frames == 1) on fps 120


@dataclass(frozen=True)
class GenerationDefaults:
    height: int = 240
    width: int = 426
    num_frames: int = 51
    seed: int = 42


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str
    text_encoder: TextEncoderConfig
    denoiser: DenoiserConfig
    vae: VAEConfig
    scheduler: SchedulerConfig
    defaults: GenerationDefaults
    # Shape limits the export supports for this model (pixels / frames). Profiles narrow them further.
    max_height: int = 720
    max_width: int = 1280
    max_frames: int = 204
    min_side: int = 16  # pixels; at least one 2x2 latent patch after 8x VAE downsampling
    random_init_seed: int = 0  # seeded init for --random-weights

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        vae = d["vae"]
        return cls(
            name=d["name"],
            family=d["family"],
            text_encoder=TextEncoderConfig(**d["text_encoder"]),
            denoiser=_tuples(DenoiserConfig, d["denoiser"]),
            vae=VAEConfig(
                spatial=_tuples(SpatialVAEConfig, vae["spatial"]),
                temporal=_tuples(TemporalVAEConfig, vae["temporal"]),
                **{k: tuple(v) if isinstance(v, list) else v for k, v in vae.items() if k not in ("spatial", "temporal")},
            ),
            scheduler=SchedulerConfig(**d["scheduler"]),
            defaults=GenerationDefaults(**d["defaults"]),
            **{k: v for k, v in d.items() if k not in ("name", "family", "text_encoder", "denoiser", "vae", "scheduler", "defaults")},
        )


def _tuples(cls, d: dict):
    """JSON turns tuples into lists; turn them back so configs compare equal after a round trip."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


OPENSORA_V1_2 = ModelConfig(
    name="opensora-v1.2",
    family="opensora-v1.2",
    text_encoder=TextEncoderConfig(),
    denoiser=DenoiserConfig(),
    vae=VAEConfig(),
    scheduler=SchedulerConfig(),
    defaults=GenerationDefaults(),
)

# Same architecture, tiny widths and depths; every ratio that matters (8x spatial / 4x temporal VAE
# compression, 17-frame chunks, 2x2 patches, head_dim even for RoPE) is kept.
OPENSORA_V1_2_TINY = ModelConfig(
    name="opensora-v1.2-tiny",
    family="opensora-v1.2",
    text_encoder=TextEncoderConfig(
        vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, max_length=32
    ),
    denoiser=DenoiserConfig(
        hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=32
    ),
    vae=VAEConfig(
        spatial=SpatialVAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4),
        temporal=TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=4),
    ),
    scheduler=SchedulerConfig(num_sampling_steps=10),
    # 34 frames = two 17-frame VAE chunks (10 latent frames); 64x64 px = 8x8 latent = 4x4 patches.
    defaults=GenerationDefaults(height=64, width=64, num_frames=34),
    max_height=128,
    max_width=128,
    max_frames=51,
)

MODELS: dict[str, ModelConfig] = {m.name: m for m in (OPENSORA_V1_2, OPENSORA_V1_2_TINY)}


# Open-Sora v1.2's configs; every family's (v2.0: osx/models_v2.py) by name: osx.families.get_model_config.
def get_model_config(name: str) -> ModelConfig:
    try:
        return MODELS[name]
    except KeyError:
        raise OsxError(
            f"unknown model {name!r}",
            hint=f"known models: {', '.join(sorted(MODELS))} (every family's: osx.families.get_model_config)",
        ) from None


# --- shape arithmetic shared by every stage -------------------------------------------------------


def latent_frames(num_frames: int, vae: VAEConfig = VAEConfig()) -> int:
    """T_lat = 5*floor(F/17) + ceil((F mod 17)/4)  (shared notes 1.4)."""
    full, rest = divmod(num_frames, vae.micro_frame_size)
    return vae.micro_z_frame_size * full + -(-rest // vae.temporal_downsample)


def latent_size(height: int, width: int, vae: VAEConfig = VAEConfig()) -> tuple[int, int]:
    return height // vae.spatial_downsample, width // vae.spatial_downsample
