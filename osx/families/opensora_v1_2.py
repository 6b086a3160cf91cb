"""Open-Sora v1.2: T5 v1.1 text encoder, STDiT3 denoiser, the spatial + temporal video VAE (torch-free).

The torch modules live in osx.export (t5, stdit3, vae, reference), the NumPy sampler in
osx.runtime.scheduler; the facts are in shared/design/open-sora-models.md.
"""

from __future__ import annotations

from osx.components import FLOAT, ComponentSpec, DimRange, TensorSpec
from osx.families.base import ComponentDecl, Family, PromptDecl, SamplerDecl, WeightSource
from osx.models import OPENSORA_V1_2, OPENSORA_V1_2_TINY, ModelConfig, SchedulerConfig, latent_frames

T5_FP16 = "T5 v1.1 overflows in float16 (its feed-forward activations exceed 65504)"
CONVOLUTIONS = "convolutions"

# --- the four components ---------------------------------------------------------------------------


def v1_2_component_specs(model: ModelConfig) -> dict[str, ComponentSpec]:
    """The specs at the model's full supported ranges. Profiles narrow `dims` with `with_dims`."""
    te, dn, vae = model.text_encoder, model.denoiser, model.vae
    L = te.max_length
    assert dn.model_max_length == L, "text encoder and denoiser must agree on the token count"
    ds = vae.spatial_downsample
    lat_h = DimRange(max(1, model.min_side // ds), model.defaults.height // ds, model.max_height // ds)
    lat_w = DimRange(max(1, model.min_side // ds), model.defaults.width // ds, model.max_width // ds)
    t_max = latent_frames(model.max_frames, vae)
    batch = DimRange(1, 2, 2)  # 2 = cond + uncond in one call (classifier-free guidance)
    lat = ("batch", vae.temporal.latent_embed_dim, "latent_frames", "latent_height", "latent_width")

    text_encoder = ComponentSpec(
        name="text_encoder",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", L), "tokens", "T5 token ids, padded with 0 to max_length"),
            TensorSpec("attention_mask", "int64", ("batch", L), "prefix_mask", "1 for real tokens, 0 for padding"),
        ),
        outputs=(TensorSpec("text_embeds", FLOAT, ("batch", L, te.d_model), doc="T5 last hidden state"),),
        dims={"batch": batch},
        vocab_size=te.vocab_size,
    )
    denoiser = ComponentSpec(
        name="denoiser",
        inputs=(
            TensorSpec("x", FLOAT, lat, "normal", "noisy latent (model-normalised)"),
            TensorSpec("timestep", "float32", ("batch",), "uniform:1:1000", "rectified-flow time in [0, 1000]"),
            TensorSpec("y", FLOAT, ("batch", L, dn.caption_channels), "normal", "text embeddings (cond or null)"),
            TensorSpec("mask", "int64", ("batch", L), "prefix_mask", "key mask over y; uncond rows use the cond mask"),
            TensorSpec("fps", "float32", ("batch",), f"const:{model.scheduler.fps}", "frames per second"),
            TensorSpec("height", "float32", ("batch",), "pixels:latent_height", "video height in pixels"),
            TensorSpec("width", "float32", ("batch",), "pixels:latent_width", "video width in pixels"),
            TensorSpec("x_mask", "float32", ("batch", "latent_frames"), "prefix_mask",
                       "per latent frame: 1 = generated, 0 = conditioned (image/video reference, modulated as t=0)"),
        ),
        outputs=(TensorSpec("v", FLOAT, lat, doc="velocity x0 - noise (first in_channels of the output)"),),
        dims={"batch": batch, "latent_frames": DimRange(1, min(t_max, latent_frames(model.defaults.num_frames, vae)), t_max),
              "latent_height": lat_h, "latent_width": lat_w},
    )
    z_chunk = vae.micro_z_frame_size
    vae_decoder = ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("z", FLOAT, ("batch", vae.temporal.latent_embed_dim, "latent_frames", "latent_height", "latent_width"),
                           "normal", "one temporal chunk of model-normalised latents"),),
        outputs=(TensorSpec("video", FLOAT, ("batch", 3, f"{vae.temporal_downsample}*latent_frames", f"{ds}*latent_height", f"{ds}*latent_width"),
                            doc="decoded frames in [-1, 1]; the runtime drops the chunk's front padding"),),
        dims={"batch": DimRange(1, 1, 2), "latent_frames": DimRange(1, z_chunk, z_chunk), "latent_height": lat_h, "latent_width": lat_w},
    )
    vae_encoder = ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("video", FLOAT, ("batch", 3, "frames", f"{ds}*latent_height", f"{ds}*latent_width"),
                           "uniform:-1:1", "one chunk of <= 17 frames in [-1, 1]"),),
        outputs=(TensorSpec("z", FLOAT, ("batch", vae.temporal.latent_embed_dim, "out_frames", "latent_height", "latent_width"),
                            doc="posterior mean, model-normalised"),),
        dims={"batch": DimRange(1, 1, 2), "frames": DimRange(1, vae.micro_frame_size, vae.micro_frame_size),
              "latent_height": lat_h, "latent_width": lat_w},
    )
    return {s.name: s for s in (text_encoder, denoiser, vae_decoder, vae_encoder)}


OPENSORA_V1_2_FAMILY = Family(
    name="opensora-v1.2",
    configs={c.name: c for c in (OPENSORA_V1_2, OPENSORA_V1_2_TINY)},
    config_from_dict=ModelConfig.from_dict,
    components=(
        ComponentDecl("text_encoder", module="text_encoder", weights="t5", quantizable=True, never_fp16=T5_FP16,
                      depth=("text_encoder.num_layers",), ort_fusions=True),
        ComponentDecl("denoiser", module="denoiser", weights="denoiser", quantizable=True, static_int8_blocks_only=True,
                      no_bf16="Conv3d patch embedding",
                      depth=("denoiser.depth",), blocks=(("spatial_blocks", "temporal_blocks"),), ort_fusions=True),
        ComponentDecl("vae_decoder", module="vae", weights="vae", no_bf16=CONVOLUTIONS),
        ComponentDecl("vae_encoder", module="vae", weights="vae", in_pipeline=False, no_bf16=CONVOLUTIONS),  # image-to-video only
    ),
    component_specs=v1_2_component_specs,
    weights=(
        WeightSource("denoiser", "denoiser (STDiT3) weights", ("x_embedder.", "spatial_blocks.", "y_embedder."),
                     ("stdit", "denoiser", "dit"), released_name="hpcai-tech/OpenSora-STDiT-v3"),
        WeightSource("vae", "VAE weights", ("spatial_vae.", "temporal_vae."), ("vae",), released_name="hpcai-tech/OpenSora-VAE-v1.2"),
        WeightSource("t5", "T5 text encoder folder", ("encoder.block.", "shared."), ("t5",), folder_file="spiece.model",
                     released_name="DeepFloyd/t5-v1_1-xxl"),
    ),
    sampler=SamplerDecl(kind="rectified-flow-v1.2", guidance_passes=2, cfg_batching=True, defaults=SchedulerConfig()),
    prompt=PromptDecl(kind="aesthetic-score"),
    reference="osx.export.reference:build_reference",
    export_parts="osx.export.reference",
    calibration="osx.export.capture_adapter",
    reference_dtype="bf16",
    references=("image", "video"),  # --image head|tail|loop, --video / --extend (osx.runtime.conditioning)
)
