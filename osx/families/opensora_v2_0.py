"""Open-Sora v2.0: T5-XXL + CLIP text towers, the MMDiT denoiser, the HunyuanVideo causal VAE (torch-free).

The torch modules live in osx.export (t5, clip, mmdit, hunyuan_vae; the whole model in pipeline_v2), the
NumPy sampler in osx.runtime.sampler_v2; the facts are in shared/design/opensora-v2.0.md.

The denoiser graph's I/O (decided here; the runtime is written against it):

    v = denoiser(img, txt, timestep, y_vec, cond, rope_cos, rope_sin)

  img      [batch, tokens, 64]  noisy latent, packed: 2x2 patches of the 16-channel latent, tokens in (t, h, w)
                                order (osx.runtime.sampler_v2.pack); the runtime keeps x packed for the whole run
  txt      [batch, 512, 4096]   T5 states (prompt / negative rows)
  timestep [batch] float32      t in [0, 1]; the graph rounds t and 1000*t to bf16 as Open-Sora does
  y_vec    [batch, 768]         CLIP pooled output
  cond     [batch, tokens, 68]  packed [mask (1 ch); masked reference latent (16 ch)]: channels 0-3 the mask
  rope_cos, rope_sin [tokens, 128] float32: RoPE tables of the image tokens (osx.models_v2.rope_tables);
                                the graph prepends the 512 text tokens' identity rotation (position 0)
  v        [batch, tokens, 64]  velocity, packed like img

Why packed I/O and host RoPE tables: the NumPy sampler runs in token space (pack once before the loop, unpack
once after), so packing inside the graph would cost two transposes per call and an unpack/repack per step in
the runtime; and the tables depend only on the video's shape, so the runtime computes them once per video
in float32, where in the graph they would need shape arithmetic (Range) and, in a graph typed fp16 for
TensorRT (export/typed_graph.py casts every float op), angles up to ~100 rad rounded to fp16 (0.06 rad
error). As inputs they are cast once at the graph's edge, values in [-1, 1]. "tokens" is one dimension
shared by img, cond, the tables and v, so the shape check ties them together.
"""

from __future__ import annotations

from osx.components import FLOAT, ComponentSpec, DimRange, TensorSpec
from osx.families.base import ComponentDecl, Family, PromptDecl, SamplerDecl, TokenizerDecl, WeightSource
from osx.families.opensora_v1_2 import CONVOLUTIONS, T5_FP16
from osx.models_v2 import (
    OPENSORA_V2_0, OPENSORA_V2_0_TINY, T2I_CONFIGS, OpenSoraV2Config, SamplerV2Config, aspect_buckets, bucket_sizes, image_size,
    image_tokens, latent_frames_v2, t2i_image_size,
)

CLIP_PAD = "<|endoftext|>"  # CLIP pads with its EOS
# Keys of the released openai/clip-vit-large-patch14 weights that the text tower does not use.
CLIP_UNUSED_PREFIXES = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale",
                        "text_model.embeddings.position_ids")
# Calibration runs text-to-video, which feeds `cond_in` zeros only; quantized with that range it rounds away
# the i2v/v2v references (tiny model: an i2v call's relative error 0.16 instead of 0.05). A 68-wide Linear.
COND_IN = "calibration runs text-to-video, which feeds it zeros only: no range for the references it embeds"
# Open-Sora's longest encoded reference: v2v_*_easy's 65 frames (v2v 33, an i2v image 1).
REFERENCE_FRAMES = 65


def _range(lo: int, opt: int, hi: int) -> DimRange:
    return DimRange(lo, min(max(opt, lo), hi), hi)


def v2_0_component_specs(cfg: OpenSoraV2Config) -> dict[str, ComponentSpec]:
    """The specs at the model's full supported ranges (every bucket, 1 to max_frames frames); profiles
    narrow `dims` with `with_dims`."""
    t5, clip, m, vae = cfg.t5, cfg.clip, cfg.mmdit, cfg.vae
    L, ds = t5.max_length, cfg.spatial_downsample
    sizes = bucket_sizes(cfg)
    d = cfg.defaults
    default_hw = image_size(cfg, d.resolution, d.aspect_ratio)
    tokens = _range(min(image_tokens(cfg, h, w, 1) for h, w in sizes), image_tokens(cfg, *default_hw, d.num_frames),
                    max(image_tokens(cfg, h, w, cfg.max_frames) for h, w in sizes))
    t_max, t_opt = latent_frames_v2(cfg.max_frames, cfg.temporal_downsample), latent_frames_v2(d.num_frames, cfg.temporal_downsample)
    # The VAE runs per spatial tile (Open-Sora's tiling, osx/vae_tiling.py on the host): at most one tile of
    # latents; the last tile of a row can be narrow.
    if vae.use_spatial_tiling:
        tile = vae.tile_latent_size
        lat_h = lat_w = DimRange(1, tile, tile)
    else:
        lat_h = _range(1, default_hw[0] // ds, max(h for h, _ in sizes) // ds)
        lat_w = _range(1, default_hw[1] // ds, max(w for _, w in sizes) // ds)
    text_batch = DimRange(1, 2, 2)  # prompt, negative (Open-Sora's third row repeats the negative)

    text_encoder = ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("batch", L), "tokens", "T5 token ids, </s> then <pad> (0) to max_length; "
                           "no attention mask: Open-Sora's T5 attends to the pads"),),
        outputs=(TensorSpec("text_embeds", FLOAT, ("batch", L, t5.d_model), doc="T5 last hidden state (the MMDiT's txt)"),),
        dims={"batch": text_batch},
        vocab_size=t5.vocab_size,
    )
    clip_spec = ComponentSpec(
        name="clip",
        inputs=(TensorSpec("input_ids", "int64", ("batch", clip.max_length), "tokens",
                           f"CLIP token ids: BOS, text, EOS, padded with EOS ({clip.pad_token_id})"),),
        outputs=(TensorSpec("pooled", FLOAT, ("batch", clip.hidden_size),
                            doc="final-LayerNorm state at the first EOS, no projection (the MMDiT's y_vec)"),),
        dims={"batch": text_batch},
        vocab_size=clip.vocab_size,
    )
    packed = ("batch", "tokens", m.in_channels)
    denoiser = ComponentSpec(
        name="denoiser",
        inputs=(
            TensorSpec("img", FLOAT, packed, "normal", "noisy latent, 2x2-packed (runtime sampler_v2.pack)"),
            TensorSpec("txt", FLOAT, ("batch", L, m.context_in_dim), "normal", "T5 states"),
            TensorSpec("timestep", "float32", ("batch",), "uniform:0:1", "rectified-flow time t in [0, 1]"),
            TensorSpec("y_vec", FLOAT, ("batch", m.vec_in_dim), "normal", "CLIP pooled output"),
            TensorSpec("cond", FLOAT, ("batch", "tokens", m.cond_channels), "normal",
                       "packed [mask; masked reference latent]; zeros for text-to-video"),
            TensorSpec("rope_cos", "float32", ("tokens", m.head_dim), "uniform:-1:1",
                       "RoPE cos of the image tokens (osx.models_v2.rope_tables)"),
            TensorSpec("rope_sin", "float32", ("tokens", m.head_dim), "uniform:-1:1", "RoPE sin of the image tokens"),
        ),
        outputs=(TensorSpec("v", FLOAT, packed, doc="velocity (noise - x0), packed like img"),),
        dims={"batch": DimRange(1, 2, 3), "tokens": tokens},  # 3 guidance passes; text-to-video runs 2
    )
    lat = ("batch", vae.latent_channels, "latent_frames", "latent_height", "latent_width")
    vae_decoder = ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("z", FLOAT, lat, "normal", "one spatial tile of normalised latents, every frame"),),
        outputs=(TensorSpec("video", FLOAT, ("batch", 3, "frames", f"{ds}*latent_height", f"{ds}*latent_width"),
                            doc="pixels about [-1, 1], frames = 4*(latent_frames-1)+1; the host blends the tiles"),),
        dims={"batch": DimRange(1, 1, 2), "latent_frames": DimRange(1, min(t_opt, t_max), t_max),
              "latent_height": lat_h, "latent_width": lat_w},
    )
    vae_encoder = ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("video", FLOAT, ("batch", 3, "frames", f"{ds}*latent_height", f"{ds}*latent_width"),
                           "uniform:-1:1", "one spatial tile of the reference, frames 4k+1 in [-1, 1]"),),
        outputs=(TensorSpec("z", FLOAT, ("batch", vae.latent_channels, "out_frames", "latent_height", "latent_width"),
                            doc="posterior mean, normalised (scale_factor * (mean - shift_factor))"),),
        dims={"batch": DimRange(1, 1, 2), "frames": DimRange(1, 1, min(REFERENCE_FRAMES, cfg.max_frames)),
              "latent_height": lat_h, "latent_width": lat_w},
    )
    specs = {s.name: s for s in (text_encoder, clip_spec, denoiser, vae_decoder, vae_encoder)}
    return {**specs, **t2i_component_specs(cfg)} if cfg.name in T2I_CONFIGS else specs


def t2i_component_specs(cfg: OpenSoraV2Config) -> dict[str, ComponentSpec]:
    """t2i2v's image step (osx.models_v2.T2I_CONFIGS; runtime/sampler_flux.py), optional components of a v2.0
    bundle: Flux.1-dev with the denoiser's packed I/O (its `guidance` scale instead of `cond`, interleaved RoPE
    tables) over one latent frame, and Flux's AE decoder (its own z / 0.3611 + 0.1159 inside) on one image.
    Ranges: every training bucket of the image resolution (osx.models_v2.aspect_buckets)."""
    t2i = T2I_CONFIGS[cfg.name]
    m, L, p = t2i.mmdit, cfg.t5.max_length, t2i.mmdit.patch_size
    sizes = list(aspect_buckets(int(t2i.image_resolution[:-2]), training=True).values())
    latent = [(p * -(-h // (8 * p)), p * -(-w // (8 * p))) for h, w in sizes]
    tokens = sorted(h * w // p**2 for h, w in latent)
    opt_h, opt_w = (p * -(-n // (8 * p)) for n in t2i_image_size(t2i, cfg.defaults.aspect_ratio))  # the default video's
    packed = ("batch", "tokens", m.in_channels)
    flux = ComponentSpec(
        name="t2i_denoiser",
        inputs=(
            TensorSpec("img", FLOAT, packed, "normal", "noisy image latent, 2x2-packed"),
            TensorSpec("txt", FLOAT, ("batch", L, m.context_in_dim), "normal", "T5 states of the raw prompt"),
            TensorSpec("timestep", "float32", ("batch",), "uniform:0:1", "rectified-flow time t in [0, 1]"),
            TensorSpec("y_vec", FLOAT, ("batch", m.vec_in_dim), "normal", "CLIP pooled output"),
            TensorSpec("guidance", "float32", ("batch",), "uniform:1:8", "the distilled guidance scale (4.0), embedded like t"),
            TensorSpec("rope_cos", "float32", ("tokens", m.head_dim), "uniform:-1:1",
                       "RoPE cos of the image tokens, interleaved pairs (osx.models_v2.rope_tables)"),
            TensorSpec("rope_sin", "float32", ("tokens", m.head_dim), "uniform:-1:1", "RoPE sin of the image tokens"),
        ),
        outputs=(TensorSpec("v", FLOAT, packed, doc="velocity, packed like img"),),
        dims={"batch": DimRange(1, 1, 2), "tokens": DimRange(tokens[0], opt_h * opt_w // p**2, tokens[-1])},
    )
    lat_h = DimRange(min(h for h, _ in latent), opt_h, max(h for h, _ in latent))
    lat_w = DimRange(min(w for _, w in latent), opt_w, max(w for _, w in latent))
    decoder = ComponentSpec(
        name="t2i_decoder",
        inputs=(TensorSpec("z", FLOAT, ("batch", t2i.ae.z_channels, "latent_height", "latent_width"), "normal",
                           "the image latent (normalised, as Flux samples it)"),),
        outputs=(TensorSpec("image", FLOAT, ("batch", 3, "8*latent_height", "8*latent_width"), doc="pixels about [-1, 1]"),),
        dims={"batch": DimRange(1, 1, 2), "latent_height": lat_h, "latent_width": lat_w},
    )
    return {flux.name: flux, decoder.name: decoder}


MMDIT_BLOCKS = (("double_blocks",), ("single_blocks",))  # what mmdit.depth and mmdit.depth_single_blocks count

OPENSORA_V2_0_FAMILY = Family(
    name="opensora-v2.0",
    configs={c.name: c for c in (OPENSORA_V2_0, OPENSORA_V2_0_TINY)},
    config_from_dict=OpenSoraV2Config.from_dict,
    components=(
        ComponentDecl("text_encoder", module="t5", weights="t5", never_fp16=T5_FP16, depth=("t5.num_layers",),
                      ort_fusions=True),
        ComponentDecl("clip", module="clip", weights="clip"),
        # fused for onnxruntime: its affine-free LayerNorms get a zero bias first (export.ort_optimize)
        ComponentDecl("denoiser", module="mmdit", weights="mmdit", quantizable=True, ort_fusions=True,
                      depth=("mmdit.depth", "mmdit.depth_single_blocks"), blocks=MMDIT_BLOCKS, full_precision=(("cond_in", COND_IN),)),
        ComponentDecl("vae_decoder", module="vae", weights="vae", no_bf16=CONVOLUTIONS),
        ComponentDecl("vae_encoder", module="vae", weights="vae", in_pipeline=False, no_bf16=CONVOLUTIONS),  # i2v / v2v
        # t2i2v's image step (`osx export --with-t2i`): Flux.1-dev and its AE decoder (t2i_component_specs)
        ComponentDecl("t2i_denoiser", module="flux", weights="flux", in_pipeline=False, optional_set="t2i",
                      depth=("t2i.mmdit.depth", "t2i.mmdit.depth_single_blocks"), blocks=MMDIT_BLOCKS),
        ComponentDecl("t2i_decoder", module="flux_ae", weights="flux_ae", in_pipeline=False, no_bf16=CONVOLUTIONS,
                      optional_set="t2i"),
    ),
    component_specs=v2_0_component_specs,
    # The MMDiT is told from Flux.1-dev (same class and block names, fused q/k/v) by its `cond_in`; the folders keep
    # the rest of the Hugging Face models (unused_prefixes). Order matters: the first whose rule matches wins.
    # Flux.1-dev and its autoencoder (BFL's `down.N`/`up.N` names; the encoder half unused) only for --with-t2i.
    weights=(
        WeightSource("mmdit", "MMDiT weights", ("cond_in.",), ("open_sora", "mmdit"), released_name="Open_Sora_v2.safetensors"),
        WeightSource("vae", "HunyuanVideo VAE weights", ("encoder.down_blocks.",), ("hunyuan", "vae"),
                     requires=("decoder.up_blocks.",), released_name="hunyuan_vae.safetensors"),
        WeightSource("t5", "T5 folder", ("encoder.block.", "shared."), ("t5",), folder_file="spiece.model",
                     unused_prefixes=("decoder.", "lm_head."), released_name="google/t5-v1_1-xxl"),
        WeightSource("clip", "CLIP folder", ("text_model.encoder.layers.",), ("clip",), folder_file="tokenizer.json",
                     unused_prefixes=CLIP_UNUSED_PREFIXES, released_name="openai/clip-vit-large-patch14"),
        WeightSource("flux", "Flux.1-dev weights", ("double_blocks.",), ("flux1-dev.",), required=False,
                     released_name="flux1-dev.safetensors"),
        WeightSource("flux_ae", "Flux autoencoder weights", ("decoder.up.",), ("flux1-dev-ae",), requires=("decoder.mid.attn_1.",),
                     unused_prefixes=("encoder.",), required=False, released_name="flux1-dev-ae.safetensors"),
    ),
    sampler=SamplerDecl(kind="rectified-flow-v2.0", guidance_passes=3, cfg_batching=True, defaults=SamplerV2Config()),
    prompt=PromptDecl(kind="fps-motion-score", tokenizers=(TokenizerDecl("text_encoder", "tokenizer.json"),
                                                           TokenizerDecl("clip", "clip_tokenizer.json", CLIP_PAD))),
    reference="osx.export.pipeline_v2:build_reference_v2",
    forward_adapter="osx.export.adapters_v2:forward_adapter",
    planner=("osx.profiles.planner_v2:make_plan_v2", "osx.profiles.planner_v2:suggest_fits_v2"),
    export_parts="osx.export.pipeline_v2",
    calibration="osx.export.capture_adapter_v2",
    reference_dtype="bf16",
    references=("image", "video"),  # i2v_head|tail|loop, v2v_head|tail (runtime/pipeline_v2.py)
)
