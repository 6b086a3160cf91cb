"""Open-Sora v2.0 configurations (torch-free).

Read by every stage like osx/models.py: export builds torch modules from these, the planner estimates memory
from them, the manifest records them. Facts: shared/design/opensora-v2.0.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from osx.errors import InputError
from osx.models import TextEncoderConfig

# --- MMDiT denoiser, T5 + CLIP text encoders, sampler ---------------------------------------------------


@dataclass(frozen=True)
class MMDiTConfig:
    """Open-Sora v2.0's Flux-style MMDiT (`opensora/models/mmdit`, configs/diffusion/inference/256px.py).

    The same class builds Flux.1-dev, t2i2v's first-frame model (`FLUX1_DEV`), by four switches; Open-Sora's
    names for them: `guidance_embed`, `cond_embed`, `fused_qkv` and `use_liger_rope` (= not interleaved).
    Always on: q/k/v biases.
    """

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    vec_in_dim: int = 768  # CLIP pooled output
    context_in_dim: int = 4096  # T5 hidden states
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims over (t, h, w); sums to head_dim
    theta: float = 10000.0
    patch_size: int = 2
    time_factor: float = 1000.0
    timestep_dim: int = 256
    guidance_embed: bool = False  # `guidance_in` embeds the distilled guidance scale into vec (Flux.1-dev)
    cond_embed: bool = True  # `cond_in` takes the i2v/v2v conditioning (mask + reference latent)
    fused_qkv: bool = False  # BFL's `*_attn.qkv` and single blocks' `linear1` instead of q/k/v_proj, v_mlp
    interleaved_rope: bool = False  # RoPE pairs (2j, 2j+1) as in BFL's Flux, not (j, j + D/2) as in v2.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def cond_channels(self) -> int:
        """`cond_in` input: the mask (one channel, 2x2 patch) + the reference latent (in_channels)."""
        return self.in_channels + self.patch_size**2

    @property
    def latent_channels(self) -> int:
        return self.in_channels // self.patch_size**2


@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14 text tower (transformers' CLIPTextConfig names); Open-Sora uses its pooled output."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    # The pooled token is the first EOS. The released config says eos_token_id=2, which makes transformers
    # take argmax(input_ids) instead; with pad = EOS = the largest id (49407) both pick the same token.
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    max_length: int = 77  # tokens; pad/truncate to exactly this


@dataclass(frozen=True)
class SamplerV2Config:
    """The v2.0 sampler (`opensora/utils/sampling.py` I2VDenoiser + get_schedule) at 256px.py's settings."""

    num_steps: int = 50
    guidance: float = 7.5  # text scale
    guidance_img: float = 3.0  # image (reference) scale
    text_osci: bool = True  # odd steps from `osci_start` on use scale 1
    image_osci: bool = True
    scale_temporal_osci: bool = True  # image-scale ramps over steps and latent frames (i2v only)
    osci_start: int = 10
    shift: bool = True
    flow_shift: float | None = None  # fixed alpha; None: from the token count and latent frames
    base_seq: int = 256  # alpha = 1 at 256 tokens per latent frame ...
    max_seq: int = 4096  # ... and 3 at 4096 (then times sqrt(T_lat))
    base_shift: float = 1.0
    max_shift: float = 3.0
    fps: int = 24  # prompt suffix " 24 FPS." and the saved video's rate
    motion_score: str = "4"  # prompt suffix " 4 motion score."
    # the dtype the loop rounds to: "bf16" as Open-Sora (x, v, the update, the timestep, the conditioning, the
    # guidance arithmetic), or "fp32" (no rounding: an exported graph then matches its reference over a whole run)
    reference_dtype: str = "bf16"


COND_TYPES = ("t2v", "i2v_head", "i2v_tail", "i2v_loop", "v2v_head", "v2v_tail", "v2v_head_easy", "v2v_tail_easy")
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "2.39:1", "1:2.39", "4:3", "3:4", "3:2", "2:3", "2:1", "1:2")


@dataclass(frozen=True)
class GenerationDefaultsV2:
    resolution: str = "256px"
    aspect_ratio: str = "16:9"
    num_frames: int = 129
    seed: int = 42


@dataclass(frozen=True)
class OpenSoraV2Config:
    name: str
    t5: TextEncoderConfig
    clip: CLIPTextConfig
    mmdit: MMDiTConfig
    sampler: SamplerV2Config
    defaults: GenerationDefaultsV2
    vae: HunyuanVAEConfig
    family: str = "opensora-v2.0"
    # Resolution buckets: name -> side of the square whose area the bucket keeps.
    resolutions: dict[str, int] = field(default_factory=lambda: {"256px": 256, "768px": 768})
    max_frames: int = 129  # frames are 4k+1 (causal VAE: first frame alone, then 4 per latent frame)
    random_init_seed: int = 0
    t2i: T2IConfig | None = None  # t2i2v's image step (Flux.1-dev), where the model has one (T2I_CONFIGS)

    @property
    def spatial_downsample(self) -> int:
        return self.vae.spatial_compression_ratio

    @property
    def scheduler(self) -> SamplerV2Config:
        """The sampler settings under the name every family's config gives them (the manifest's `scheduler`)."""
        return self.sampler

    @property
    def temporal_downsample(self) -> int:
        return self.vae.time_compression_ratio

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "OpenSoraV2Config":
        """Inverse of `to_dict` (after a JSON round trip: lists back to tuples)."""
        parts = {"t5": TextEncoderConfig, "clip": CLIPTextConfig, "mmdit": MMDiTConfig, "sampler": SamplerV2Config,
                 "defaults": GenerationDefaultsV2, "vae": HunyuanVAEConfig}
        fields = {k: _tuples(parts[k], v) if k in parts else v for k, v in d.items()}
        if fields.get("t2i") is not None:
            t2i = fields["t2i"]
            fields["t2i"] = T2IConfig(**{**t2i, "mmdit": _tuples(MMDiTConfig, t2i["mmdit"]), "ae": _tuples(FluxAEConfig, t2i["ae"])})
        return cls(**fields)


def _tuples(cls, d: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- shape arithmetic ----------------------------------------------------------------------------------


def image_size(cfg: OpenSoraV2Config, resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) in pixels of a resolution bucket and aspect ratio "W:H", as Open-Sora's inference.

    With P = side^2 and r = long/short side: long = floor(sqrt(P*r)/16)*16, short = floor(P/long/16)*16;
    portrait ratios swap the two (the design doc's table: 256px 16:9 -> 192x336, 9:16 -> 336x192,
    1:2.39 -> 384x160). Both are multiples of 16, so Open-Sora's round-up to 16 changes nothing.
    """
    if resolution not in cfg.resolutions:
        raise InputError(f"unknown resolution {resolution!r} for {cfg.name}", hint=f"use one of {', '.join(cfg.resolutions)}")
    try:
        w, h = (float(v) for v in aspect_ratio.split(":"))
        assert w > 0 and h > 0
    except (ValueError, AssertionError):
        raise InputError(f"aspect ratio {aspect_ratio!r} is not W:H", hint=f"e.g. {', '.join(ASPECT_RATIOS[:4])}") from None
    area = cfg.resolutions[resolution] ** 2
    long = int(math.sqrt(area * max(w, h) / min(w, h)) / 16) * 16
    short = int(area / long / 16) * 16
    if short < 16:
        raise InputError(f"aspect ratio {aspect_ratio} leaves a side under 16 px at {resolution}", hint="use a milder ratio")
    return (short, long) if w >= h else (long, short)


def check_frames(cfg: OpenSoraV2Config, num_frames: int) -> None:
    if not (1 <= num_frames <= cfg.max_frames and (num_frames - 1) % cfg.temporal_downsample == 0):
        raise InputError(
            f"num_frames={num_frames}: {cfg.name} takes 4k+1 frames from 1 to {cfg.max_frames}",
            hint=f"e.g. 1, 33, 65, {cfg.max_frames}" if cfg.max_frames >= 65 else f"e.g. 1, 5, 9, {cfg.max_frames}",
        )


def latent_frames_v2(num_frames: int, temporal_downsample: int = 4) -> int:
    """Causal VAE: the first frame alone, then one latent frame per 4: T_lat = (F-1)/4 + 1."""
    return 1 if num_frames == 1 else (num_frames - 1) // temporal_downsample + 1


def latent_shape(cfg: OpenSoraV2Config, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
    """[C, T_lat, h, w] of the noise: h, w = 2*ceil(H/16), 2*ceil(W/16) (whole 2x2 patches)."""
    block = cfg.spatial_downsample * cfg.mmdit.patch_size
    p = cfg.mmdit.patch_size
    return (cfg.mmdit.latent_channels, latent_frames_v2(num_frames, cfg.temporal_downsample),
            p * -(-height // block), p * -(-width // block))


def image_tokens(cfg: OpenSoraV2Config, height: int, width: int, num_frames: int) -> int:
    """The MMDiT's image tokens for a video: T_lat * ceil(H/16) * ceil(W/16) (whole 2x2 patches of latents)."""
    _, T, h, w = latent_shape(cfg, height, width, num_frames)
    return T * (h // cfg.mmdit.patch_size) * (w // cfg.mmdit.patch_size)


def bucket_sizes(cfg: OpenSoraV2Config) -> list[tuple[int, int]]:
    """(height, width) of every resolution bucket and aspect ratio the model takes."""
    sizes = []
    for r in cfg.resolutions:
        for a in ASPECT_RATIOS:
            try:
                sizes.append(image_size(cfg, r, a))
            except InputError:  # a ratio too extreme for a tiny resolution
                pass
    return sizes


def rope_tables(m: MMDiTConfig, latent_frames: int, patch_rows: int, patch_cols: int):
    """RoPE cos and sin [T*h*w, head_dim] float32 of the image tokens (in `pack`'s (t, h, w) order), NumPy.

    What the denoiser graph takes as `rope_cos`/`rope_sin` (the text tokens sit at position (0, 0, 0), whose
    rotation is the identity: the graph adds them). Per axis a (dims d_a): angles pos_a * theta**(-2j/d_a),
    j < d_a/2, concatenated over (t, h, w) and laid out for the config's pairing (rotate-half: the angle list
    twice; interleaved: each angle twice in place). As export/mmdit.py `rope_tables` computes them in torch:
    frequencies and angles rounded to float32, cos/sin of the float32 angle rounded once to float32.
    """
    import numpy as np

    pos = np.stack(np.meshgrid(np.arange(latent_frames), np.arange(patch_rows), np.arange(patch_cols), indexing="ij"),
                   axis=-1).reshape(-1, 3).astype(np.float32)
    angles = []
    for a, d in enumerate(m.axes_dim):
        omega = (1.0 / np.float32(m.theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))).astype(np.float32)
        angles.append(pos[:, a : a + 1] * omega)
    angles = np.concatenate(angles, axis=-1).astype(np.float64)
    angles = np.repeat(angles, 2, axis=-1) if m.interleaved_rope else np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# --- prompts -------------------------------------------------------------------------------------------


def prepare_prompt_v2(prompt: str, fps: int = 24, motion_score: str = "4") -> str:
    """The text Open-Sora v2.0 encodes for a prompt (scripts/diffusion/inference.py):
    strip, end with ".", append " {fps} FPS." unless it already ends with "<digits> FPS.", then append
    " {motion_score} motion score.". "raining, sea" -> "raining, sea. 24 FPS. 4 motion score.".
    Negative prompts get no suffix (see `negative_prompt_v2`)."""
    if str(motion_score) == "dynamic":
        raise InputError("motion score 'dynamic' asks an OpenAI model in Open-Sora; osx does not",
                         hint="give a number, e.g. 4 (Open-Sora's default)")
    text = prompt.strip()
    if not text.endswith("."):
        text += "."
    if not re.search(r"\d+ FPS\.$", text):
        text += f" {fps} FPS."
    return f"{text} {motion_score} motion score."


def negative_prompt_v2(negative: str | None) -> str:
    """Open-Sora's negative prompt: the given text unchanged, or "" (encoded like any prompt: T5 gets
    `</s>` and pads, CLIP BOS, EOS and pads; no learned null embedding)."""
    return "" if negative is None else negative


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


# --- the named models (after both sections: they hold a VAE config) -------------------------------------

OPENSORA_V2_0 = OpenSoraV2Config(
    name="opensora-v2.0",
    t5=TextEncoderConfig(max_length=512),  # google/t5-v1_1-xxl: the same network as v1.2's T5, 512 tokens
    clip=CLIPTextConfig(),
    mmdit=MMDiTConfig(),
    sampler=SamplerV2Config(),
    defaults=GenerationDefaultsV2(),
    vae=HUNYUAN_VAE,
)

# Same structure, tiny widths and depths. Kept: 2x2 patches over 16 latent channels (so the 68-channel
# cond input and the packing are the real ones), three RoPE axes summing to the head dim, both block kinds.
OPENSORA_V2_0_TINY = OpenSoraV2Config(
    name="opensora-v2.0-tiny",
    t5=TextEncoderConfig(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, max_length=32),
    clip=CLIPTextConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=510, eos_token_id=511, pad_token_id=511, max_length=32,
    ),
    mmdit=MMDiTConfig(
        vec_in_dim=32, context_in_dim=32, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2,
        axes_dim=(4, 6, 6),
    ),
    sampler=SamplerV2Config(num_steps=12),  # > osci_start, so oscillation is exercised
    defaults=GenerationDefaultsV2(resolution="64px", aspect_ratio="1:1", num_frames=9),
    vae=HUNYUAN_VAE_TINY,
    resolutions={"64px": 64, "96px": 96},  # 96 px: larger than the tiny VAE's 64 px tiles
    max_frames=33,
)

# Flux.1-dev (BFL's flux1-dev.safetensors), the t2i2v image model: Open-Sora builds it from the same class
# (`t2i2v_*.py` configs) with the flags at Flux's values; the tiny one keeps the v2.0 tiny widths.
_FLUX_SWITCHES = dict(guidance_embed=True, cond_embed=False, fused_qkv=True, interleaved_rope=True)
FLUX1_DEV = MMDiTConfig(**_FLUX_SWITCHES)
FLUX1_DEV_TINY = dataclasses.replace(OPENSORA_V2_0_TINY.mmdit, **_FLUX_SWITCHES)
FLUX_MODELS: dict[str, MMDiTConfig] = {"flux1-dev": FLUX1_DEV, "flux1-dev-tiny": FLUX1_DEV_TINY}

@dataclass(frozen=True)
class FluxAEConfig:
    """Flux.1's 2D image autoencoder (BFL's `flux1-dev-ae.safetensors`; Open-Sora's `autoencoder_2d`), of
    which t2i2v uses the decoder: pixels = decoder(z / scale_factor + shift_factor), 8x up, 16 channels."""

    z_channels: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    out_ch: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


FLUX1_AE = FluxAEConfig()
# Four levels (8x, the real geometry) with one channel change; GroupNorm(32): widths stay multiples of 32
FLUX1_AE_TINY = FluxAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


@dataclass(frozen=True)
class T2IConfig:
    """t2i2v's image step (configs/diffusion/inference/plugins/t2i2v.py, `modify_option_to_t2i`): Flux.1-dev
    makes the first frame in one guidance-distilled pass per step (the scale goes in as `guidance`, no CFG),
    at `image_resolution` with the training aspect-ratio buckets (`t2i_image_size`), from the raw prompt;
    the schedule is the v2.0 one (same fields, same rule) at one latent frame."""

    mmdit: MMDiTConfig
    ae: FluxAEConfig
    image_resolution: str = "768px"
    num_steps: int = 50
    guidance: float = 4.0  # the distilled guidance embedding's input
    shift: bool = True
    flow_shift: float | None = None
    base_seq: int = 256
    max_seq: int = 4096
    base_shift: float = 1.0
    max_shift: float = 3.0


# Open-Sora's bucket list (opensora/datasets/aspect.py ASPECT_RATIO_LD_LIST, W:H); portrait ones are added
# as the transposes of these, after them, so "16:9" ends up as the transpose of "9:16"'s bucket.
_BUCKET_RATIOS = ("2.39:1", "2:1", "16:9", "1.85:1", "9:16", "5:8", "3:2", "4:3", "1:1")


def aspect_buckets(side: int, training: bool, block: int = 16) -> dict[str, tuple[int, int]]:
    """Open-Sora's `get_aspect_ratios_dict(side**2, training)`: {"W:H": (height, width)}.

    width = floor(sqrt(P*w/h)/16)*16, height = floor(P/width/16)*16. With `training` the pair then moves by
    one 16 px step on one side when that brings H*W closer to P, and a bucket equal to an earlier one is
    dropped (with its transpose). At 768px training moves 2:1, 1.85:1, 3:2 and 4:3 (e.g. 4:3 -> 672x880)."""
    area = side * side
    buckets, portrait = {}, {}
    for ratio in _BUCKET_RATIOS:
        w_r, h_r = (float(v) for v in ratio.split(":"))
        width = int(math.sqrt(area * (w_r / h_r)) // block) * block
        height = int((area / width) // block) * block
        if training:
            best = abs(height * width - area)
            for h, w in ((height - block, width), (height + block, width), (height, width - block), (height, width + block)):
                if abs(h * w - area) < best:
                    height, width, best = h, w, abs(h * w - area)
        if not training or (height, width) not in buckets.values():
            buckets[ratio] = (height, width)
            portrait[":".join(ratio.split(":")[::-1])] = (width, height)
    buckets.update(portrait)
    return buckets


def t2i_image_size(t2i: T2IConfig, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) of t2i2v's image: the video's aspect ratio in the training buckets at the image
    resolution ("768px": a 768x768 area; Open-Sora's `get_image_size(img_resolution, ar)`, training=True)."""
    if not re.fullmatch(r"[1-9]\d*px", t2i.image_resolution):
        raise InputError(f"image resolution {t2i.image_resolution!r} is not NNNpx", hint="e.g. 768px")
    buckets = aspect_buckets(int(t2i.image_resolution[:-2]), training=True)
    if aspect_ratio not in buckets:
        raise InputError(f"aspect ratio {aspect_ratio} has no text-to-image bucket",
                         hint=f"t2i2v takes {', '.join(buckets)} (Open-Sora's training buckets)")
    return buckets[aspect_ratio]

# The image step of each v2.0 model's t2i2v flow (the tiny one: tiny Flux at 112 px, larger than its 64 px video),
# held by the model's config (so a validation cut of Flux's blocks is a config like the MMDiT's)
OPENSORA_V2_0 = dataclasses.replace(OPENSORA_V2_0, t2i=T2IConfig(mmdit=FLUX1_DEV, ae=FLUX1_AE))
OPENSORA_V2_0_TINY = dataclasses.replace(OPENSORA_V2_0_TINY, t2i=T2IConfig(
    mmdit=FLUX1_DEV_TINY, ae=FLUX1_AE_TINY, image_resolution="112px", num_steps=6))
MODELS_V2: dict[str, OpenSoraV2Config] = {m.name: m for m in (OPENSORA_V2_0, OPENSORA_V2_0_TINY)}
T2I_CONFIGS: dict[str, T2IConfig] = {m.name: m.t2i for m in MODELS_V2.values()}


def get_model_config_v2(name: str) -> OpenSoraV2Config:
    try:
        return MODELS_V2[name]
    except KeyError:
        raise InputError(f"unknown Open-Sora v2.0 model {name!r}", hint=f"known: {', '.join(sorted(MODELS_V2))}") from None
