"""The Open-Sora v2.0 family declaration (osx/families/opensora_v2_0.py) against independent facts: the design
doc's token counts, the torch modules' state-dict keys and RoPE tables, and the planner reading it."""

import numpy as np
import pytest
import torch

from osx.families import family_of, get_family, get_model_config, never_fp16
from osx.models_v2 import FLUX1_DEV_TINY, OPENSORA_V2_0, OPENSORA_V2_0_TINY, rope_tables
from osx.profiles import load_profile
from osx.profiles.fit import plan_that_fits

FAMILY = get_family("opensora-v2.0")


def test_the_declaration():
    assert family_of(OPENSORA_V2_0) is FAMILY and get_model_config("opensora-v2.0-tiny") is OPENSORA_V2_0_TINY
    assert FAMILY.names() == ("text_encoder", "clip", "denoiser", "vae_decoder", "vae_encoder", "t2i_denoiser", "t2i_decoder")
    assert FAMILY.names(pipeline_only=True) == ("text_encoder", "clip", "denoiser", "vae_decoder")
    assert FAMILY.optional_sets == ("t2i",) and FAMILY.optional_set("t2i") == ("t2i_denoiser", "t2i_decoder")
    assert {FAMILY.component(n).weights for n in FAMILY.optional_set("t2i")} == {"flux", "flux_ae"}
    assert not any(FAMILY.weight_source(p).required for p in ("flux", "flux_ae"))
    assert FAMILY.quantizable == ("denoiser",) and tuple(FAMILY.never_fp16) == ("text_encoder",)
    assert never_fp16("text_encoder") and never_fp16("clip") is None
    assert (FAMILY.sampler.kind, FAMILY.sampler.guidance_passes) == ("rectified-flow-v2.0", 3)
    assert FAMILY.prompt.text_encoders == ("text_encoder", "clip")
    assert len({t.file for t in FAMILY.prompt.tokenizers}) == 2  # two tokenizer files in the bundle
    assert OPENSORA_V2_0_TINY.scheduler.num_steps == 12  # the config's own sampler settings go to the manifest


def test_specs_follow_the_config():
    specs = FAMILY.component_specs(OPENSORA_V2_0)
    assert specs["text_encoder"].inputs[0].shape == ("batch", 512) and specs["clip"].inputs[0].shape == ("batch", 77)
    assert [t.name for t in specs["denoiser"].inputs] == ["img", "txt", "timestep", "y_vec", "cond", "rope_cos", "rope_sin"]
    # shared/design/opensora-v2.0.md section 1.2 / 6: 240 tokens a frame at 256px 2.39:1 (the fewest), 8,316 at
    # 256px 16:9 129 frames (the default), 76,032 at 768px 129 frames (the most)
    tokens = specs["denoiser"].dims["tokens"]
    assert (tokens.min, tokens.opt, tokens.max) == (240, 8316, 76032)
    assert specs["denoiser"].resolve(specs["denoiser"].inputs[4], {"batch": 3, "tokens": 8316}) == (3, 8316, 68)
    assert specs["vae_decoder"].dims["latent_height"].max == 32  # Open-Sora's 256 px tiles
    assert specs["vae_decoder"].dims["latent_frames"].max == 33 and specs["vae_encoder"].dims["frames"].max == 65


@pytest.mark.parametrize("cfg", [OPENSORA_V2_0_TINY.mmdit, FLUX1_DEV_TINY, OPENSORA_V2_0.mmdit], ids=["tiny", "flux", "real"])
def test_numpy_rope_tables_equal_the_torch_models(cfg):
    from osx.export.mmdit import video_rope

    T, h, w, L = 3, 5, 7, 4
    cos, sin = rope_tables(cfg, T, h, w)
    tcos, tsin = video_rope(cfg, L, T, h, w)
    assert cos.shape == (T * h * w, cfg.head_dim) and cos.dtype == np.float32
    # float32 cos/sin of the same float32 angles; libm and torch may round the last bit differently
    np.testing.assert_allclose(cos, tcos[0, L:].numpy(), rtol=0, atol=2e-7)
    np.testing.assert_allclose(sin, tsin[0, L:].numpy(), rtol=0, atol=2e-7)
    assert torch.all(tcos[0, :L] == 1) and torch.all(tsin[0, :L] == 0)  # text: the identity the graph prepends


def test_weight_sources_tell_the_released_parts_apart():
    from osx.export.checkpoint import identify_part
    from osx.export.flux_ae import FluxAEDecoder
    from osx.export.mmdit import MMDiT
    from osx.export.pipeline_v2 import build_modules
    from osx.models_v2 import FLUX1_AE_TINY

    modules = build_modules(OPENSORA_V2_0_TINY, meta=("t5", "clip", "mmdit", "vae"))
    with torch.device("meta"):
        others = {"flux": MMDiT(FLUX1_DEV_TINY), "flux_ae": FluxAEDecoder(FLUX1_AE_TINY)}
    for name, module in {**modules, **others}.items():
        keys = list(module.state_dict())
        if name == "clip":  # the released folder holds the whole CLIP model
            keys += ["vision_model.embeddings.class_embedding", "logit_scale"]
        assert identify_part(keys, FAMILY.weights) == name  # the first rule that matches, in declaration order
        assert sum(w.matches(keys) for w in FAMILY.weights) == (2 if name == "mmdit" else 1), name  # Flux's rule too


def test_plans_shape_the_declared_dims():
    """The planner's optimisation profiles name exactly the spec's dims (the export narrows the spec with them)."""
    specs = FAMILY.component_specs(OPENSORA_V2_0)
    plan = plan_that_fits(load_profile("rtx4090"), OPENSORA_V2_0, with_t2i=True)
    assert tuple(plan.components) == FAMILY.names()
    for name, c in plan.components.items():
        for profile in c.profiles:
            assert set(profile) == set(specs[name].dims), name
    assert plan.components["denoiser"].profiles[0]["tokens"].max == 33 * 12 * 21  # 192x336x129: 252 a frame
    cpu = plan_that_fits(load_profile("cpu"), OPENSORA_V2_0_TINY, with_t2i=True)
    tiny = FAMILY.component_specs(OPENSORA_V2_0_TINY)
    assert all(c.profiles == [tiny[n].dims] for n, c in cpu.components.items())
