"""TensorRT for Open-Sora v2.0 bundles, without TensorRT: the engine build settings and shapes of every v2.0
component as the plan derives them from the family declaration (real size, pure), and `osx build` + PipelineV2 on
the tensorrt backend over the tiny t2i bundle through the stand-in TensorRT (tests/trt_standin.py): every
component built strongly typed from its typed graph, the transformers the plan streams built with
WEIGHT_STREAMING and run with the plan's budget set before their execution context, refusals with their fix.
What only TensorRT can check (the engines' numbers, a real streamed run) is in tests/test_tensorrt_gpu.py."""

import json
import shutil

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.cli import main
from osx.export.engines import build_settings, profile_shapes
from osx.families import component_specs
from osx.models_v2 import OPENSORA_V2_0
from osx.profiles import load_profile
from osx.profiles.planner_v2 import make_plan_v2
from trt_standin import activate, osx_build, plan_of

ALL = ("text_encoder", "clip", "denoiser", "vae_decoder", "vae_encoder", "t2i_denoiser", "t2i_decoder")
TRANSFORMERS = ("denoiser", "t2i_denoiser")
BUCKETS = ["64x64x9", "96x96x5"]  # the tiny model's two sizes: 3 and 2 latent frames, 4x4 and 6x6 tokens a frame


def _profile(path, vram_gib: float = 4, cpu: tuple[str, ...] = (), gpu_name: str = "NVIDIA GeForce RTX 4070",
             cc: str = "8.9") -> str:
    """A card (cc 8.0+) for the tiny v2.0 model; weight streaming allowed (used only where a transformer does not fit)."""
    float32 = {"vae_decoder", "vae_encoder", "t2i_decoder"} & set(cpu)
    precision = "\n".join(f'{c} = "{"fp32" if c in float32 else "fp16" if c == "denoiser" else "bf16"}"' for c in ALL)
    path.write_text(f"""
name = "test-gpu"
display_name = "{gpu_name}"
compute_capability = "{cc}"
vram_gib = {vram_gib}
reserve_gib = 0
workspace_gib = 0
load_one_at_a_time = true
pcie_gbps = 25.0
[precision]
text_encoder = "bf16"
denoiser = "fp16"
vae_decoder = "bf16"
[shapes]
buckets = ["64x64x34"]
[family."opensora-v2.0"]
weight_streaming = true
cpu_components = {json.dumps(list(cpu))}
[family."opensora-v2.0".precision]
{precision}
[family."opensora-v2.0".shapes]
buckets = {json.dumps(BUCKETS)}
cfg_batching = true
""")
    return str(path)


# 1 MB for the weights and activations of the component on the card: the tiny denoiser (946,560 weight bytes in
# fp16, 834,316 of activations + 98,304 of streaming scratch) and Flux (978,944 + 205,576 + 98,304) do not fit
# whole and stream; the VAEs (several MB of activations) run on the CPU.
STREAMED = dict(vram_gib=0.001, cpu=("vae_decoder", "vae_encoder", "t2i_decoder"))


@pytest.fixture
def bundle(tiny_t2i_bundle, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_t2i_bundle, out)
    return out


@pytest.mark.parametrize("gpu,streamed", [("rtx4090", False), ("rtx4080", True), ("rtx4070", True)])
def test_real_size_build_settings_and_shapes(gpu, streamed):
    """Each v2.0 component's engine settings and optimisation-profile shapes at real size, from the shipped plan:
    the MMDiT alone is built streamable on the 16/12 GB cards, keeping the plan's device share of its weights; the
    shapes are the declared inputs' at the 192x336 bucket (independent arithmetic: 25 or 33 latent frames of
    12 x 21 tokens; the VAE tiles of the 24 x 42 latent: Open-Sora's 32-latent tiles every 24, so 24 x 32 and the
    short last one 24 x 18, both on the bucket's one profile)."""
    plan = make_plan_v2(load_profile(gpu), OPENSORA_V2_0)
    assert plan.fits and set(plan.components) == set(ALL[:5])
    specs = component_specs(OPENSORA_V2_0)
    (bucket,) = plan.buckets
    T = (bucket.frames - 1) // 4 + 1
    for name, c in plan.components.items():
        settings = build_settings(c)
        assert settings["strongly_typed"] and settings["workspace_bytes"] == c.workspace_bytes
        if name == "denoiser" and streamed:
            s = plan.streaming["denoiser"]
            assert settings["weight_streaming_budget"] == s.device_bytes == c.weight_bytes - c.streamed_bytes > 0
            assert c.run_bytes <= plan.budget_bytes < c.weight_bytes + c.activation_bytes + c.workspace_bytes
        else:
            assert "weight_streaming_budget" not in settings
        (dims,) = c.profiles
        shapes = profile_shapes(specs[name], dims)
        assert set(shapes) == {t.name for t in specs[name].inputs}
        if name == "denoiser":
            tokens = T * (bucket.height // 16) * (bucket.width // 16)
            assert shapes["img"] == ((1, tokens, 64), (3, tokens, 64), (3, tokens, 64))
            assert shapes["rope_cos"] == ((tokens, 128),) * 3 and shapes["txt"][2] == (3, 512, 4096)
        elif name == "vae_decoder":
            assert shapes["z"] == ((1, 16, 1, 24, 18), (1, 16, T, 24, 32), (1, 16, T, 24, 32))
        elif name == "vae_encoder":  # a reference of up to 33 frames, at most the bucket's, per 192 x 256 px tile
            f = min(bucket.frames, 33)
            assert shapes["video"] == ((1, 3, 1, 192, 144), (1, 3, f, 192, 256), (1, 3, f, 192, 256))
        else:  # T5's 512 tokens, CLIP's 77; prompt and negative
            L = 77 if name == "clip" else 512
            assert shapes["input_ids"] == ((1, L), (2, L), (2, L))
    assert not streamed or plan.streaming["denoiser"].streamed_bytes > 0


def test_build_every_component_and_generate(bundle, tmp_path, monkeypatch):
    """`osx build` of the tiny v2.0 bundle with t2i: an engine for each of the seven components, strongly typed from
    a graph of its type (no precision flag), one optimisation profile per bucket as the plan says, each engine's
    shapes those of the declared inputs; then PipelineV2 on the tensorrt backend (t2i2v: T5, CLIP, Flux, its AE,
    the VAE encoder, the MMDiT, the VAE decoder) makes the same video as onnxruntime at 96 px, where the VAEs run
    a full (8) and a short (6 latent) tile per axis on one profile. The stand-in runs each engine's fp32 graph,
    where onnxruntime runs the fused one: within 1 uint8 level (measured 1)."""
    from osx.runtime import Pipeline

    calls, rt = activate(monkeypatch, "11.4.0.106", bundle)
    profile = _profile(tmp_path / "gpu.toml")
    osx_build(bundle, profile)
    b = Bundle.open(bundle)  # checksums: the cast graphs and the engines are in the manifest
    builds = {c[1].rsplit("/", 1)[-1].split(".")[0]: c for c in calls if c[0] == "build"}
    assert set(builds) == set(ALL)
    assert all(strongly and not {"FP16", "BF16", "WEIGHT_STREAMING"} & set(flags) for _, _, flags, strongly in builds.values())
    from osx.commands.build import bundle_plan

    plan = bundle_plan(b, load_profile(profile))
    for name in ALL:
        (engine,) = b.components[name].engines
        precision = plan.components[name].precision
        assert engine.key["precision"] == precision and engine.onnx_file == f"{name}.{precision}.onnx"
        assert plan_of(b.path(engine.file))["profiles"] == [
            {i: [list(s) for s in v] for i, v in profile_shapes(b.spec(name), dims).items()} for dims in plan.components[name].profiles]
    assert len(b.components["denoiser"].engines[0].profiles()) == 2  # tokens 48 (64 px, 3 frames) and 72 (96 px, 2)
    kwargs = dict(seed=3, steps=2, resolution="96px", aspect_ratio="1:1", num_frames=5, t2i2v=True, t2i_steps=2)
    trt_pipe, ort_pipe = Pipeline.load(bundle), Pipeline.load(bundle, "onnxruntime")
    try:
        assert {type(x).__name__ for x in trt_pipe.backends.values()} == {"TrtBackend"}
        got, want = trt_pipe.generate("a red fox", **kwargs), ort_pipe.generate("a red fox", **kwargs)
    finally:
        trt_pipe.release()
        ort_pipe.release()
    assert got.shape == want.shape == (5, 96, 96, 3)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert not rt.blocks  # every device and pinned buffer freed


@pytest.mark.parametrize("version", ["10.8.0.43", "11.4.0.106"])
def test_streamed_transformers_get_the_plans_budget(bundle, tmp_path, monkeypatch, version):
    """On a card too small for the tiny transformers (STREAMED), the plan streams the MMDiT and Flux: both are built
    with WEIGHT_STREAMING, their keys hold the plan's device share of their weights, and PipelineV2 on TensorRT sets
    that budget (at most the engine's streamable bytes) on each before creating its execution context."""
    from osx.commands.build import bundle_plan
    from osx.runtime import Pipeline

    calls, _ = activate(monkeypatch, version, bundle)
    profile = _profile(tmp_path / "small.toml", **STREAMED)
    osx_build(bundle, profile)
    b = Bundle.open(bundle)
    plan = bundle_plan(b, load_profile(profile))
    assert set(plan.streaming) == set(TRANSFORMERS)
    flags = {c[1].rsplit("/", 1)[-1].split(".")[0]: c[2] for c in calls if c[0] == "build"}
    assert {n for n, f in flags.items() if "WEIGHT_STREAMING" in f} == set(TRANSFORMERS)
    assert set(flags) == {"text_encoder", "clip", *TRANSFORMERS}  # the VAEs run on the CPU
    budgets = {n: b.components[n].engines[0].key["build_flags"]["weight_streaming_budget"] for n in TRANSFORMERS}
    assert budgets == {n: plan.streaming[n].device_bytes for n in TRANSFORMERS}
    del calls[:]
    pipe = Pipeline.load(bundle)
    try:
        pipe.generate("a red fox", seed=1, steps=2, num_frames=9, t2i2v=True, t2i_steps=2)
    finally:
        pipe.release()
    made = [c for c in calls if c[0] in ("weight_streaming_budget_v2", "create_execution_context")]
    set_budgets = [c[1] for c in made if c[0] == "weight_streaming_budget_v2"]
    assert len(set_budgets) == 2 and all(0 < v <= max(budgets.values()) for v in set_budgets)
    # each budget right before the context of its engine; the other four engines get none
    assert [c[0] for c in made].count("create_execution_context") == 4
    for i, c in enumerate(made):
        if c[0] == "weight_streaming_budget_v2":
            assert made[i + 1][0] == "create_execution_context"


def test_an_engine_built_unstreamable_is_refused(bundle, tmp_path, monkeypatch):
    """A key that asks for weight streaming on an engine TensorRT cannot stream: a BundleError that says to rebuild."""
    from osx.errors import BundleError
    from osx.runtime.backend_trt import TrtBackend

    activate(monkeypatch, "11.4.0.106", bundle)
    osx_build(bundle, _profile(tmp_path / "small.toml", **STREAMED))
    b = Bundle.open(bundle)
    engine = b.path(b.components["denoiser"].engines[0].file)
    plan = plan_of(engine)
    engine.write_text(json.dumps({**plan, "flags": [], "streamable": 0}))
    with pytest.raises(BundleError) as e:
        TrtBackend(b, "denoiser").load()
    assert "built without TensorRT's weight-streaming flag" in e.value.message and "osx build" in e.value.hint


def test_without_tensorrt_a_v2_build_says_what_to_install(bundle, tmp_path, monkeypatch, capsys):
    """A GPU but no TensorRT package: `osx build` of a v2.0 bundle exits 2 with the install command, before copying anything."""
    import osx.engine_key as compat
    from osx.engine_key import Machine

    monkeypatch.setattr(compat, "this_machine", lambda: Machine("NVIDIA GeForce RTX 4070", (8, 9), {}, "00000000:01:00.0"))
    with pytest.raises(SystemExit) as e:
        main(["build", str(bundle), "--gpu", _profile(tmp_path / "gpu.toml")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs the full TensorRT package" in err and "pip install -e '.[tensorrt]'" in err
    assert not (bundle / "engines").exists()
