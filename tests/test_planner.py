"""The planner: parameter counts, memory estimates for the real opensora-v1.2 config (hand-computed here),
precision and shapes per component, refusals with suggestions that really fit, and the dry-run JSON."""

import json

import pytest
import torch

from osx.components import DimRange
from osx.families import component_specs
from osx.errors import OsxError
from osx.export.stdit3 import STDiT3
from osx.export.t5 import T5TextEncoder
from osx.export.vae import VideoAutoencoder
from osx.models import get_model_config
from osx.profiles import Bucket, dry_run, load_profile, make_plan, plan_that_fits, render_plan, suggest_fits
from osx.profiles.params import component_params

GIB = 1 << 30
REAL = get_model_config("opensora-v1.2")
TINY = get_model_config("opensora-v1.2-tiny")
# Parameter counts of the released checkpoints (shared/design/opensora-v1.2-state-dicts.md, listed by
# instantiating Open-Sora's and transformers' own modules at the released configs).
T5_XXL_ENCODER = 4_762_310_656
STDIT3 = 1_207_643_972
Y_EMBEDDING = 300 * 4096  # 1,228,800 values
VAE = 393_341_007
VAE_SPATIAL, VAE_TEMPORAL = 83_653_863, 309_687_144


def _count(module, where=lambda name: True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if where(n))


def _modules(cfg):
    with torch.device("meta"):  # shapes only: the real model costs nothing to build
        return T5TextEncoder(cfg.text_encoder), STDiT3(cfg.denoiser), VideoAutoencoder(cfg.vae)


def test_parameter_counts_of_the_real_checkpoints():
    assert component_params(REAL, "text_encoder").total == T5_XXL_ENCODER
    assert component_params(REAL, "denoiser").total == STDIT3 + Y_EMBEDDING
    vae = component_params(REAL, "vae_decoder").total + component_params(REAL, "vae_encoder").total
    assert vae == VAE == VAE_SPATIAL + VAE_TEMPORAL


@pytest.mark.parametrize("cfg", [TINY, REAL], ids=["tiny", "real"])
def test_parameter_counts_match_the_torch_modules(cfg):
    t5, stdit, vae = _modules(cfg)
    assert component_params(cfg, "text_encoder").total == _count(t5)
    assert component_params(cfg, "denoiser").total == _count(stdit) + stdit.y_embedder.y_embedding.numel()
    decoding = lambda n: "decoder" in n or "post_quant_conv" in n  # noqa: E731  what the vae_decoder graph holds
    assert component_params(cfg, "vae_decoder").total == _count(vae, decoding)
    assert component_params(cfg, "vae_encoder").total == _count(vae, lambda n: not decoding(n))


def _stdit3_matrix_values() -> int:
    """Linear/conv weight values of STDiT3-XL/2, from its state-dict shapes (C = 1152, 56 blocks)."""
    C = 1152
    per_block = 3456 * C + C * C + C * C + 2304 * C + C * C + 4608 * C + C * 4608  # qkv, proj, q, kv, proj, fc1, fc2
    stem = 1152 * 4 * 1 * 2 * 2 + 2 * (1152 * 256 + 1152 * 1152) + 6912 * 1152 + 1152 * 4096 + 1152 * 1152
    return stem + 56 * per_block + 32 * 1152


def test_memory_estimate_rtx4070_real_model():
    plan = make_plan(load_profile("rtx4070"), REAL)
    te, den, vae = (plan.components[c] for c in ("text_encoder", "denoiser", "vae_decoder"))
    # Weights at precision. bf16: 2 bytes per value. FP8: matrices 1 byte, the rest stays 16-bit.
    assert te.precision == "bf16" and te.weight_bytes == 2 * T5_XXL_ENCODER
    matrix = _stdit3_matrix_values()
    assert den.precision == "fp8" and den.weight_bytes == matrix + 2 * (STDIT3 + Y_EMBEDDING - matrix)
    _, _, vae_module = _modules(REAL)
    assert vae.weight_bytes == 2 * _count(vae_module, lambda n: "decoder" in n or "post_quant_conv" in n)
    # Denoiser activations at its largest bucket, 360x640 px x 102 frames: latent 30 x 45 x 80, padded to
    # 46 x 80 -> 23 x 40 = 920 patches per frame, 27,600 tokens; batch 2 (CFG), 16-bit, 12 x hidden live
    # per token + text (y 4096, projected y and k/v 3 x 1152 per token, 300 tokens) + fp32 latents in/out.
    tokens = 30 * 23 * 40
    expected = 2 * tokens * 12 * 1152 * 2 + 2 * 300 * (4096 + 3 * 1152) * 2 + 2 * 2 * 4 * 30 * 45 * 80 * 4
    assert den.activation_bytes == expected
    workspace = int(1.5 * GIB)
    assert te.workspace_bytes == den.workspace_bytes == workspace
    # Loaded one at a time: the peak is the largest component; each run holds its execution context's
    # device memory: activations and tactic scratch up to the workspace; the build times tactics with the same.
    runs = [c.weight_bytes + c.activation_bytes + workspace for c in (te, den, vae)]
    assert plan.run_peak_bytes == max(runs)
    assert plan.build_peak_bytes == max(runs)
    assert plan.run_peak_bytes == runs[0], "T5-XXL dominates"
    assert plan.budget_bytes == 11 * GIB and plan.build_peak_bytes <= plan.budget_bytes


def test_dry_run_json_rtx4070():
    d = json.loads(dry_run("rtx4070", "opensora-v1.2", as_json=True))
    assert d["name"] == "rtx4070" and d["backend"] == "tensorrt"
    assert d["components"]["denoiser"]["precision"] == "fp8" and d["components"]["denoiser"]["strongly_typed"]
    assert d["components"]["text_encoder"]["precision"] == "bf16"
    assert d["load_one_at_a_time"] is True
    mem = d["memory"]
    assert mem["fits"] and max(mem["run_peak"], mem["build_peak"]) <= mem["budget"] < 12 * GIB
    text = dry_run("rtx4070", "opensora-v1.2")
    assert "fits" in text and "fp8*" in text and "one at a time" in text


def test_cli_export_dry_run_json(capsys):
    from osx.cli import main

    main(["export", "--gpu", "rtx4070", "--model", "opensora-v1.2", "--dry-run", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["components"]["denoiser"]["precision"] == "fp8" and d["load_one_at_a_time"] and d["memory"]["fits"]
    main(["export", "--gpu", "rtx4070", "--model", "opensora-v1.2", "--dry-run"])
    assert "budget 11.00 GiB: fits" in capsys.readouterr().out


def test_cpu_plan_is_onnxruntime_fp32_full_ranges():
    plan = make_plan(load_profile("cpu"), TINY)
    specs = component_specs(TINY)
    assert plan.backend == "onnxruntime" and not plan.buckets
    for name, c in plan.components.items():
        assert (c.precision, c.backend, c.device) == ("fp32", "onnxruntime", "cpu")
        assert c.profiles == [specs[name].dims] and c.workspace_bytes == 0
    assert "full dynamic ranges" in render_plan(plan)


def test_static_buckets_become_optimisation_profiles():
    plan = make_plan(load_profile("rtx4070"), REAL)
    den, vae, te = plan.components["denoiser"], plan.components["vae_decoder"], plan.components["text_encoder"]
    assert [b.name for b in plan.buckets] == ["240x426x51", "240x426x102", "360x640x51", "360x640x102"]
    assert len(den.profiles) == 4 and len(vae.profiles) == 2 and len(te.profiles) == 1  # VAE: per resolution
    p = den.profiles[den.bucket_profile["360x640x102"]]
    assert p["latent_frames"] == DimRange(30, 30, 30) and p["latent_height"] == DimRange(45, 45, 45)
    assert p["latent_width"] == DimRange(80, 80, 80) and p["batch"] == DimRange(1, 2, 2)
    v = vae.profiles[vae.bucket_profile["240x426x51"]]
    assert v["latent_frames"] == DimRange(1, 5, 5) and v["batch"] == DimRange(1, 1, 1)  # chunks of 5, the last shorter
    assert vae.bucket_profile["240x426x51"] == vae.bucket_profile["240x426x102"]


def test_dynamic_profile_spans_the_buckets():
    p = load_profile("rtx4090").with_changes(dynamic_shapes=True)
    den = make_plan(p, REAL).components["denoiser"]
    assert len(den.profiles) == 1
    assert den.profiles[0]["latent_height"] == DimRange(30, 60, 60) and den.profiles[0]["latent_frames"] == DimRange(15, 30, 30)


def _assert_suggestions_really_fit(profile, precision="auto"):
    with pytest.raises(OsxError) as e:
        plan_that_fits(profile, REAL, precision)
    assert "budget" in e.value.message and "GiB" in e.value.message
    assert "nearest settings that fit" in e.value.hint
    suggestions = suggest_fits(profile, REAL, precision)
    assert suggestions
    for s in suggestions:
        plan = plan_that_fits(s.profile, REAL, s.precision)
        assert plan.fits and max(plan.run_peak_bytes, plan.build_peak_bytes) <= plan.budget_bytes
        assert all(change in e.value.hint for change in s.changes)
    return suggestions


def test_oversized_plan_is_refused_with_suggestions_that_fit():
    big = load_profile("rtx4070").with_changes(buckets=(Bucket(480, 854, 204), Bucket(240, 426, 51)), load_one_at_a_time=False)
    (suggestion,) = _assert_suggestions_really_fit(big, "fp16")
    # Loading one component at a time is not enough: the VAE decoder at 480p (all 20 frames of a chunk at
    # full resolution) is above the budget at any frame count, so the 480p bucket goes and what fitted stays.
    assert suggestion.changes[0] == "load_one_at_a_time = true"
    assert Bucket(240, 426, 51) in suggestion.profile.buckets
    assert all(b.height < 480 for b in suggestion.profile.buckets)
    assert not make_plan(big.with_changes(load_one_at_a_time=True), REAL, "fp16").fits


def test_t5_that_cannot_fit_8gb_is_moved_to_the_cpu():
    p = load_profile("rtx4060").with_changes(cpu_components=(), precision={"text_encoder": "bf16", "denoiser": "fp8", "vae_decoder": "bf16"})
    suggestions = _assert_suggestions_really_fit(p)
    assert all("text_encoder" in s.profile.cpu_components for s in suggestions)
    plan = make_plan(suggestions[0].profile, REAL, suggestions[0].precision)
    assert plan.components["text_encoder"].backend == "onnxruntime" and plan.components["text_encoder"].precision == "fp32"
    assert plan.host_peak_bytes >= 4 * T5_XXL_ENCODER  # fp32 on the host


def test_precision_override_applies_to_the_denoiser_only():
    plan = make_plan(load_profile("rtx4090"), REAL, "int8")
    assert plan.components["denoiser"].precision == "int8" and plan.components["text_encoder"].precision == "bf16"
    cpu = make_plan(load_profile("cpu"), TINY, "int8")
    assert cpu.components["denoiser"].precision == "int8"
    with pytest.raises(OsxError, match="not available on the CPU"):
        make_plan(load_profile("cpu"), TINY, "fp16")


def test_quantized_t5_keeps_fp32_outside_qdq():
    """Calibration keeps T5 fp32 outside Q/DQ (it overflows in fp16): its INT8 weights count the non-matrix
    values and its activations at 4 bytes; the denoiser's at 2."""
    from osx.profiles.params import component_params
    from osx.profiles.planner import activation_bytes, weight_bytes

    te = component_params(REAL, "text_encoder")
    assert weight_bytes(REAL, "text_encoder", "int8") == te.matrix + 4 * te.other
    sizes = {"batch": 2}
    assert activation_bytes(REAL, "text_encoder", sizes, "int8", True) == activation_bytes(REAL, "text_encoder", sizes, "fp32", True)
    den = component_params(REAL, "denoiser")
    assert weight_bytes(REAL, "denoiser", "fp8") == den.matrix + 2 * den.other
