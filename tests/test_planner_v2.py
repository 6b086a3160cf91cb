"""Plans for Open-Sora v2.0 at real size on the shipped 24, 16 and 12 GB profiles, against arithmetic written
out here (shared/design/opensora-v2.0.md's parameter counts and shapes), and the parameter formulas against
the torch modules at the tiny config."""

import json
from pathlib import Path

import pytest

from osx.cli import main
from osx.errors import OsxError
from osx.models_v2 import OPENSORA_V2_0, OPENSORA_V2_0_TINY
from osx.profiles import load_profile, plan_that_fits, profile_from_dict, shipped_profiles
from osx.profiles.params_v2 import component_params_v2
from osx.profiles.planner_v2 import make_plan_v2

GIB = 1 << 30
C = 3072  # MMDiT hidden size
FAMILY = "opensora-v2.0"

# shared/design/opensora-v2.0.md, "Component sizes" and sections 2.8 / 4
DOC_PARAMS = {"denoiser": 11_891_390_528, "text_encoder": 4_762_310_656, "clip": 123_060_480,
              "vae_decoder": 146_136_067 + 16 * 16 + 16, "vae_encoder": 100_341_408 + 32 * 32 + 32}
# biases, norm scales (16-bit in an FP8 engine): top level; per double-block stream; per single block
MMDIT_OTHER = (9 * C + 64) + 19 * 2 * (15 * C + 2 * 128) + 38 * (11 * C + 2 * 128)
FP8_DENOISER = (DOC_PARAMS["denoiser"] - MMDIT_OTHER) + 2 * MMDIT_OTHER


@pytest.mark.parametrize("component", list(DOC_PARAMS))
def test_parameter_counts_are_the_released_ones(component):
    assert component_params_v2(OPENSORA_V2_0, component).total == DOC_PARAMS[component]


def test_parameter_formulas_match_the_torch_modules_at_tiny_size():
    torch = pytest.importorskip("torch")
    from osx.export.clip import CLIPTextEncoder
    from osx.export.hunyuan_vae import HunyuanVideoVAE
    from osx.export.mmdit import MMDiT

    cfg = OPENSORA_V2_0_TINY
    with torch.device("meta"):
        mmdit, clip, vae = MMDiT(cfg.mmdit), CLIPTextEncoder(cfg.clip), HunyuanVideoVAE(cfg.vae)
    count = lambda *mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    assert component_params_v2(cfg, "denoiser").total == count(mmdit)
    assert component_params_v2(cfg, "clip").total == count(clip)
    assert component_params_v2(cfg, "vae_decoder").total == count(vae.decoder, vae.post_quant_conv)
    assert component_params_v2(cfg, "vae_encoder").total == count(vae.encoder, vae.quant_conv)
    # FP8 stores the matrices in one byte, the vectors (biases, norm scales) in two
    assert component_params_v2(cfg, "denoiser").other == sum(p.numel() for p in mmdit.parameters() if p.dim() == 1)


def denoiser_activations(frames: int, rows: int = 3) -> int:
    """192x336 (256px 16:9): latent 24x42, 12x21 = 252 tokens per latent frame, + 512 text tokens; 16 hidden
    widths live per token in bf16; float32 I/O: img, velocity (64), cond (68), text (512x4096), pooled (768), t;
    RoPE cos/sin [N, 128] float32."""
    T = (frames - 1) // 4 + 1
    n_img = T * 252
    N = n_img + 512
    return rows * N * 16 * C * 2 + rows * (n_img * 196 + 512 * 4096 + 768 + 1) * 4 + 2 * N * 128 * 4


def vae_decoder_activations(frames: int) -> int:
    """One 24x32 latent tile (Open-Sora's 32-wide tiles over a 24x42 latent) of all frames at 192x256 px:
    3 maps of the 256 channels entering the last up block + one of its 128; the dense bool mask over
    T*24*32 tokens; float32 pixels out and latents in/out."""
    T = (frames - 1) // 4 + 1
    return frames * 192 * 256 * (3 * 256 + 128) * 2 + (T * 24 * 32) ** 2 + frames * 3 * 192 * 256 * 4 + 2 * 16 * T * 24 * 32 * 4


def run_cli(*args) -> tuple[int, str]:
    """`osx ARGS`: (exit code, what it printed)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue()


def dry_run(*args) -> tuple[int, str]:
    """`osx export --model opensora-v2.0 --dry-run ARGS`."""
    return run_cli("export", "--model", FAMILY, "--dry-run", *args)


def plan_json(gpu: str) -> dict:
    code, text = dry_run("--gpu", gpu, "--json")
    assert code == 0, text
    return json.loads(text)


def test_rtx4090_runs_the_fp8_denoiser_whole_one_component_at_a_time():
    d = plan_json("rtx4090")
    assert [b["name"] for b in d["buckets"]] == ["192x336x129"] and d["load_one_at_a_time"]
    den = d["components"]["denoiser"]
    assert den["precision"] == "fp8" and den["memory"]["weights"] == FP8_DENOISER
    assert den["memory"]["activations"] == denoiser_activations(129)
    assert den["memory"]["run"] == FP8_DENOISER + denoiser_activations(129) + 3 * GIB and den["memory"]["streamed"] == 0
    vae = d["components"]["vae_decoder"]["memory"]
    assert vae["activations"] == vae_decoder_activations(129)
    t5 = d["components"]["text_encoder"]["memory"]
    assert t5["weights"] == 2 * DOC_PARAMS["text_encoder"]
    runs = [c["memory"]["run"] for c in d["components"].values()]
    assert d["memory"]["run_peak"] == max(runs) == den["memory"]["run"]  # one at a time: the largest
    assert d["memory"]["budget"] == 23 * GIB and d["memory"]["fits"] and d["weight_streaming"] == {}


@pytest.mark.parametrize("gpu,frames,budget_gib,workspace_gib", [("rtx4080", 129, 15, 2), ("rtx4070", 97, 11, 1.5)])
def test_16_and_12_gb_cards_stream_the_denoiser_weights(gpu, frames, budget_gib, workspace_gib):
    d = plan_json(gpu)
    assert [b["name"] for b in d["buckets"]] == [f"192x336x{frames}"] and d["memory"]["fits"]
    scratch = 2 * C * 6 * C  # two of the largest FP8 layer (the 18432x3072 modulation)
    device = budget_gib * GIB - denoiser_activations(frames) - int(workspace_gib * GIB) - scratch
    streamed = FP8_DENOISER - device
    ws = d["weight_streaming"]["denoiser"]
    assert ws["weight_streaming_budget"] == device and ws["streamed_per_call"] == streamed and ws["calls_per_step"] == 1
    assert ws["seconds_per_step"] == pytest.approx(streamed / 25e9) and ws["seconds_per_run"] == pytest.approx(50 * streamed / 25e9)
    den = d["components"]["denoiser"]["memory"]
    assert den["run"] == den["build"] == budget_gib * GIB  # the streaming budget fills the card, building too
    assert d["memory"]["build_peak"] <= d["memory"]["budget"]
    assert any("weight streaming" in n and "per step" in n for n in d["notes"])


def test_rtx4070_refuses_129_frames_with_the_nearest_that_fit():
    """The 129-frame VAE tile (11.3 GiB of activations, GroupNorm over all frames) does not fit 11 GiB; the
    refusal names the longest 4k+1 video that does, and that one is planned to fit while the next is not."""
    profile = load_profile("rtx4070")
    fam = profile.families[FAMILY]
    at = lambda f: profile.with_changes(families={FAMILY: fam.with_changes(buckets=(type(fam.buckets[0])(192, 336, f),))})  # noqa: E731
    with pytest.raises(OsxError) as e:
        plan_that_fits(at(129), OPENSORA_V2_0)
    assert "does not fit rtx4070" in e.value.message and "vae_decoder" in e.value.message
    assert '"192x336x105"' in e.value.hint
    assert make_plan_v2(at(105), OPENSORA_V2_0).fits and not make_plan_v2(at(109), OPENSORA_V2_0).fits
    assert vae_decoder_activations(129) + 2 * DOC_PARAMS["vae_decoder"] + int(1.5 * GIB) > 11 * GIB


def test_an_fp8_mmdit_engine_is_not_built_whole_on_a_12_gb_card():
    """Without weight streaming the 11.9B FP8 engine's build (weights + activations + workspace) exceeds the
    12 GB card: refused, and the suggestion is to stream."""
    profile = load_profile("rtx4070")
    whole = profile.with_changes(families={FAMILY: profile.families[FAMILY].with_changes(weight_streaming=False)})
    plan = make_plan_v2(whole, OPENSORA_V2_0)
    assert plan.build_peak_bytes == FP8_DENOISER + denoiser_activations(97) + int(1.5 * GIB) > plan.budget_bytes
    with pytest.raises(OsxError) as e:
        plan_that_fits(whole, OPENSORA_V2_0)
    assert 'family."opensora-v2.0".weight_streaming = true' in e.value.hint


def test_profiles_without_v2_settings_and_bad_tables_are_refused(tmp_path):
    v1_only = tmp_path / "mine.toml"
    text = Path(load_profile("rtx4060").source).read_text()
    v1_only.write_text(text[: text.index("\n# Open-Sora v2.0")])
    code, text = dry_run("--gpu", str(v1_only))
    assert code == 2 and "has no settings for opensora-v2.0" in text and 'add a [family."opensora-v2.0"] table' in text
    base = {"name": "x", "compute_capability": "8.9", "vram_gib": 24, "precision": {"text_encoder": "bf16",
            "denoiser": "fp8", "vae_decoder": "bf16"}, "shapes": {"buckets": ["192x336x129"]}}
    with pytest.raises(OsxError, match="must be a table of"):
        profile_from_dict({**base, "family": {FAMILY: {"vram_gib": 48}}})
    with pytest.raises(OsxError, match="pcie_gbps"):
        profile_from_dict({**base, "pcie_gbps": 0})
    bad_frames = profile_from_dict({**base, "family": {FAMILY: {"shapes": {"buckets": ["192x336x128"]}}}})
    with pytest.raises(OsxError, match="4k\\+1"):
        make_plan_v2(bad_frames, OPENSORA_V2_0)


def test_cpu_plan_and_text_output():
    d = plan_json("cpu")
    assert d["backend"] == "onnxruntime" and all(c["device"] == "cpu" for c in d["components"].values())
    code, text = dry_run("--gpu", "rtx4070")
    assert code == 0 and "denoiser batch 3" in text and "+0.15 s per step" in text


@pytest.mark.parametrize("gpu", [g for g in shipped_profiles() if g != "cpu"])
def test_every_shipped_gpu_plans_v2_and_fits(gpu):
    """Each GPU profile's v2.0 table fits its own card, streaming only when the denoiser would not fit whole."""
    profile = load_profile(gpu)
    plan = plan_that_fits(profile, OPENSORA_V2_0)
    assert plan.fits and max(plan.run_peak_bytes, plan.build_peak_bytes) <= plan.budget_bytes
    den = plan.components["denoiser"]
    whole = den.weight_bytes + den.activation_bytes + den.workspace_bytes
    assert ("denoiser" in plan.streaming) == (whole > plan.budget_bytes)
    assert profile.pcie_gbps and profile.pcie_gbps > 0


# --- t2i2v: Flux.1-dev and its AE decoder (--with-t2i) ---------------------------------------------------

FLUX_PARAMS, FLUX_AE_DECODER_PARAMS = 11_901_408_320, 49_545_475  # the design doc; tests/test_flux_ae.py (meta count)
FLUX_OTHER = MMDIT_OTHER + C  # guidance_in's two biases (2C) instead of cond_in's one (C); blocks alike
FP8_FLUX = (FLUX_PARAMS - FLUX_OTHER) + 2 * FLUX_OTHER


def flux_activations(tokens: int = 36 * 64) -> int:
    """The 16:9 image, 576x1024 (768px training bucket): latent 72x128, 36x64 = 2304 tokens + 512 text, one row;
    float32 I/O: img, velocity (64 each), text, pooled, t, guidance; RoPE tables."""
    N = tokens + 512
    return N * 16 * C * 2 + (tokens * 128 + 512 * 4096 + 768 + 2) * 4 + 2 * N * 128 * 4


def flux_decoder_activations() -> int:
    """576x1024 px: 3 maps of the 256 channels entering the last level + one of its 128 (bf16); the mid
    block's one-head scores over 72x128 latent pixels (bf16); float32 pixels out and latent in."""
    return 576 * 1024 * (3 * 256 + 128) * 2 + (72 * 128) ** 2 * 2 + (3 * 576 * 1024 + 16 * 72 * 128) * 4


def test_t2i_parameter_counts():
    torch = pytest.importorskip("torch")
    from osx.export.flux_ae import FluxAEDecoder
    from osx.export.mmdit import MMDiT
    from osx.models_v2 import T2I_CONFIGS

    assert component_params_v2(OPENSORA_V2_0, "t2i_denoiser").total == FLUX_PARAMS
    assert component_params_v2(OPENSORA_V2_0, "t2i_decoder").total == FLUX_AE_DECODER_PARAMS
    tiny = T2I_CONFIGS[OPENSORA_V2_0_TINY.name]
    with torch.device("meta"):
        flux, ae = MMDiT(tiny.mmdit), FluxAEDecoder(tiny.ae)
    assert component_params_v2(OPENSORA_V2_0_TINY, "t2i_denoiser").total == sum(p.numel() for p in flux.parameters())
    assert component_params_v2(OPENSORA_V2_0_TINY, "t2i_denoiser").other == sum(p.numel() for p in flux.parameters() if p.dim() == 1)
    assert component_params_v2(OPENSORA_V2_0_TINY, "t2i_decoder").total == sum(p.numel() for p in ae.parameters())


def test_rtx4090_holds_both_fp8_transformers_one_at_a_time():
    d = plan_json_t2i("rtx4090")
    flux, dec, den = (d["components"][n] for n in ("t2i_denoiser", "t2i_decoder", "denoiser"))
    assert flux["precision"] == "fp8" and flux["needs_calibration"] and dec["precision"] == "bf16"
    assert flux["profiles"] == [{"batch": {"min": 1, "opt": 1, "max": 1}, "tokens": {"min": 2304, "opt": 2304, "max": 2304}}]
    assert dec["profiles"] == [{"batch": {"min": 1, "opt": 1, "max": 1}, "latent_height": {"min": 72, "opt": 72, "max": 72},
                                "latent_width": {"min": 128, "opt": 128, "max": 128}}]
    assert flux["memory"]["weights"] == FP8_FLUX and flux["memory"]["activations"] == flux_activations()
    assert flux["memory"]["run"] == FP8_FLUX + flux_activations() + 3 * GIB and flux["memory"]["streamed"] == 0
    assert dec["memory"]["weights"] == 2 * FLUX_AE_DECODER_PARAMS and dec["memory"]["activations"] == flux_decoder_activations()
    # one at a time: the peak is the larger transformer's run, not the two together
    assert d["memory"]["run_peak"] == den["memory"]["run"] > flux["memory"]["run"]
    assert FP8_FLUX + FP8_DENOISER > 23 * GIB - 6 * GIB  # both together would not leave room for activations
    assert d["memory"]["fits"] and d["weight_streaming"] == {} and any("one transformer loaded at a time" in n for n in d["notes"])


def test_12_gb_card_streams_both_transformers_16_gb_only_the_video_one():
    d = plan_json_t2i("rtx4070")  # budget 11 GiB, workspace 1.5 GiB
    scratch = 2 * C * 6 * C
    device = 11 * GIB - (flux_activations() + scratch) - int(1.5 * GIB)
    ws = d["weight_streaming"]["t2i_denoiser"]
    assert ws["weight_streaming_budget"] == device and ws["streamed_per_call"] == FP8_FLUX - device
    assert ws["calls_per_step"] == 1 and ws["seconds_per_run"] == pytest.approx(50 * (FP8_FLUX - device) / 25e9)
    assert "denoiser" in d["weight_streaming"] and d["memory"]["fits"]
    d16 = plan_json_t2i("rtx4080")  # 15 GiB: Flux at 2304 tokens fits whole, the video denoiser streams
    assert FP8_FLUX + flux_activations() + 2 * GIB < 15 * GIB
    assert set(d16["weight_streaming"]) == {"denoiser"} and d16["memory"]["fits"]


def test_t2i_image_of_the_video_bucket():
    from osx.profiles.planner_v2 import t2i_image

    assert t2i_image(OPENSORA_V2_0, 192, 336) == (576, 1024)  # 16:9
    assert t2i_image(OPENSORA_V2_0, 256, 256) == (768, 768)
    assert t2i_image(OPENSORA_V2_0, 224, 288) == (672, 880)  # 4:3: the training bucket, not 656x880
    assert t2i_image(OPENSORA_V2_0, 336, 192) == (1024, 576)


def test_without_with_t2i_nothing_changes_and_wrong_uses_are_refused():
    assert not {"t2i_denoiser", "t2i_decoder"} & set(plan_json("rtx4090")["components"])
    code, text = dry_run_model("opensora-v1.2", "--gpu", "rtx4090", "--with-t2i")
    assert code == 2 and "--with-t2i is for text -> image -> video" in text and "opensora-v2.0" in text
    code, text = dry_run_model(FAMILY, "--gpu", "rtx4090", "--with-t2i", "--json")
    assert code == 0 and "t2i_denoiser" in json.loads(text)["components"]
    code, text = run_cli("export", "--model", "opensora-v1.2-tiny", "--random-weights", "--with-t2i", "--out", "/nonexistent/x")
    assert code == 2 and "opensora-v1.2-tiny has no t2i components" in text and "drop --with-t2i" in text


@pytest.mark.parametrize("gpu", [g for g in shipped_profiles() if g != "cpu"])
def test_every_shipped_gpu_plans_t2i2v_and_fits(gpu):
    plan = plan_that_fits(load_profile(gpu), OPENSORA_V2_0, with_t2i=True)
    assert plan.fits and plan.components["t2i_denoiser"].precision == plan.components["denoiser"].precision


def dry_run_model(model: str, *args) -> tuple[int, str]:
    return run_cli("export", "--model", model, "--dry-run", *args)


def plan_json_t2i(gpu: str) -> dict:
    code, text = dry_run_model(FAMILY, "--gpu", gpu, "--with-t2i", "--json")
    assert code == 0, text
    return json.loads(text)
