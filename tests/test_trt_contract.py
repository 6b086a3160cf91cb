"""Contract tests of the TensorRT calls osx makes, without TensorRT: stand-in `tensorrt` modules that expose
only TensorRT 10's or only TensorRT 11's API surface (tests/trt_standin.py) drive `osx build` and the
backend's load path. A removed API (BuilderFlag.FP16 / BF16 on 11, ICudaEngine.device_memory_size) fails
as it would there; the recorded calls show every engine is built strongly typed from a graph typed as the
plan says, on the profiled GPU, and that the backend's transport returns the graph's outputs exactly."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from osx.bundle import Bundle
from osx.cli import main
from osx.errors import OsxError
from trt_standin import BUS_ID, activate, osx_build, plan_of

VERSIONS = ["10.8.0.43", "11.4.0.106"]
# a cc 8.9 card's plan; the VAE encoder (references) at the decoder's precision
PLANNED = {"text_encoder": "bf16", "denoiser": "fp16", "vae_decoder": "bf16", "vae_encoder": "bf16"}
ONNX_TYPE = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


def _profile(path) -> str:
    path.write_text("""
name = "test-gpu"
display_name = "NVIDIA GeForce RTX 4070"
compute_capability = "8.9"
vram_gib = 4
reserve_gib = 0.5
workspace_gib = 1
load_one_at_a_time = true
[precision]
text_encoder = "bf16"
denoiser = "fp16"
vae_decoder = "bf16"
[shapes]
buckets = ["64x64x34", "32x32x17"]
""")
    return str(path)


@pytest.fixture
def standin(monkeypatch, tmp_path):
    """Install the stand-ins for one TensorRT version and point osx at a machine that has it."""
    return lambda version, **cudart: activate(monkeypatch, version, tmp_path / "tiny", **cudart)


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    out = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, out)
    return out


@pytest.mark.parametrize("version", VERSIONS)
def test_build_is_strongly_typed_from_typed_graphs(standin, bundle, tmp_path, version):
    calls, _ = standin(version)
    osx_build(bundle, _profile(tmp_path / "gpu.toml"))
    b = Bundle.open(bundle)  # checksums: the cast graphs and engines are in the manifest
    networks = [c[1] for c in calls if c[0] == "create_network"]
    builds = [c for c in calls if c[0] == "build"]
    assert len(builds) == len(PLANNED) == len(networks)
    for _, _, flags, strongly_typed in builds:
        assert strongly_typed and not {"FP16", "BF16", "INT8", "FP8"} & set(flags)
    assert [c for c in calls if c[0] == "set_timing_cache"] == [("set_timing_cache", False)] * len(PLANNED)  # mismatch not ignored
    for name, precision in PLANNED.items():
        comp = b.components[name]
        (engine,) = comp.engines
        assert engine.onnx_file == f"{name}.{precision}.onnx" == comp.onnx_files[precision]
        assert engine.key["build_flags"]["strongly_typed"]
        graph = onnx.load(b.path(engine.onnx_file), load_external_data=False).graph
        floats = {t.data_type for t in graph.initializer} - {onnx.TensorProto.INT64, onnx.TensorProto.BOOL}
        # Only the engine's type, plus float32 Resize scales (ONNX allows nothing else there).
        assert ONNX_TYPE[precision] in floats and floats <= {ONNX_TYPE[precision], onnx.TensorProto.FLOAT}
        plan = plan_of(b.path(engine.file))
        assert plan["onnx"] == engine.onnx_file
        assert len(plan["profiles"]) == (1 if name == "text_encoder" else 2)  # one per bucket (T5: bucket-free)
    assert ("cudaDeviceGetByPCIBusId", b"0000:01:00.0") in calls and ("cudaSetDevice", 0) in calls


@pytest.mark.parametrize("version", VERSIONS)
def test_weight_streaming_build_and_load(standin, bundle, tmp_path, monkeypatch, version):
    """A component the plan streams (profiles/planner_v2.py sets its streamed bytes) is built with
    WEIGHT_STREAMING, its engine key records the weights it keeps on the card, and the backend sets that
    budget (weight_streaming_budget_v2) before making the execution context; other components are untouched."""
    import osx.export.engines as engines
    from osx.runtime.backend_trt import TrtBackend

    real = engines.build_settings

    def streamed(cplan, **kw):
        if cplan.name == "denoiser":
            cplan = dataclasses.replace(cplan, streamed_bytes=cplan.weight_bytes // 3)
        return real(cplan, **kw)

    monkeypatch.setattr(engines, "build_settings", streamed)
    calls, _ = standin(version)
    osx_build(bundle, _profile(tmp_path / "gpu.toml"))
    flags = {Path(c[1]).name.split(".")[0]: c[2] for c in calls if c[0] == "build"}
    assert "WEIGHT_STREAMING" in flags["denoiser"] and not any("WEIGHT_STREAMING" in flags[n] for n in ("text_encoder", "vae_decoder"))
    b = Bundle.open(bundle)
    budgets = {n: b.components[n].engines[0].key["build_flags"].get("weight_streaming_budget") for n in PLANNED}
    assert budgets["denoiser"] > 0 and budgets["text_encoder"] is None is budgets["vae_decoder"]
    with TrtBackend(b, "denoiser") as backend:
        engine = backend.engine
        assert engine.weight_streaming_budget_v2 == min(budgets["denoiser"], engine.streamable_weights_size) > 0
        assert backend.weight_streaming["streamed_bytes"] == engine.streamable_weights_size - engine.weight_streaming_budget_v2
    with TrtBackend(b, "vae_decoder") as backend:
        assert backend.weight_streaming is None
    order = [c[0] for c in calls if c[0] in ("weight_streaming_budget_v2", "create_execution_context")]
    assert order == ["weight_streaming_budget_v2", "create_execution_context", "create_execution_context"]


@pytest.mark.parametrize("version", VERSIONS)
def test_backend_load_path(standin, bundle, tmp_path, version):
    """Load and run each engine through TrtBackend: outputs equal onnxruntime's on the fp32 graph (the
    stand-in runs that graph), so shapes, profiles, pinned staging and dtypes are carried exactly. The
    onnxruntime side runs the bundle's fused graph (GELU/norm fusions), which rounds differently from the
    portable graph the stand-in runs: 1.9e-6 absolute measured, so 1e-5 of each output's scale."""
    from osx.runtime.backend_trt import TrtBackend
    from osx.runtime.backends import OrtBackend

    calls, rt = standin(version)
    osx_build(bundle, _profile(tmp_path / "gpu.toml"))
    b = Bundle.open(bundle)
    for name in PLANNED:
        spec = b.spec(name)
        trt_backend, ort_backend = TrtBackend(b, name), OrtBackend(b, name)
        try:
            for i, dims in enumerate(trt_backend.limits()):  # each profile of the engine, at its largest
                sizes = {d: r.max for d, r in dims.items() if d != "batch"}
                inputs = spec.sample_inputs(sizes, seed=i)
                got, want = trt_backend.run(inputs), ort_backend.run(inputs)
                for out, ref in want.items():
                    np.testing.assert_allclose(got[out], ref, rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
        finally:
            trt_backend.release()
            ort_backend.release()
    assert ("deserialize_cuda_engine", "mmap") in calls  # the plan is mapped, not read into a copy
    assert any(c[0] == "cudaMallocHost" for c in calls) and not rt.blocks  # pinned staging; everything freed


def test_parser_failure_names_component_and_node(standin, bundle, tmp_path, monkeypatch):
    import sys

    from osx.export.engines import build_engines
    from osx.profiles import load_profile, make_plan
    from trt_standin import make_tensorrt

    calls, _ = standin("11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", make_tensorrt("11.4.0.106", calls, reject_ops=("Softmax",)))
    b = Bundle.open(bundle)
    plan = make_plan(load_profile(_profile(tmp_path / "gpu.toml")), b.model_config())
    with pytest.raises(OsxError) as e:
        build_engines(bundle, {"denoiser": b.components["denoiser"]}, plan, progress=False)
    assert "denoiser: TensorRT's ONNX parser rejected denoiser.fp16.onnx" in e.value.message
    assert "(Softmax): unsupported" in e.value.message and "--dry-run" in e.value.hint


def test_timing_cache_mismatch_is_reported(standin, bundle, tmp_path):
    from osx.export.engines import build_engines
    from osx.profiles import load_profile, make_plan

    standin("11.4.0.106")
    cache = tmp_path / "shared.timing-cache"
    cache.write_bytes(b'{"tensorrt": "10.8.0.43"}')
    b = Bundle.open(bundle)
    plan = make_plan(load_profile(_profile(tmp_path / "gpu.toml")), b.model_config())
    built = build_engines(bundle, {"text_encoder": b.components["text_encoder"]}, plan, timing_cache=cache, progress=False)
    assert "written by another TensorRT version or GPU" in built["text_encoder"].report["notes"][0]
    assert b"11.4.0.106" in cache.read_bytes()  # replaced by this build's cache


def test_old_driver_says_which_driver_or_package(standin, bundle):
    from osx.runtime.backend_trt import TrtBackend

    standin("11.4.0.106", driver=12080, runtime=13000)  # cuda-python 13 on a CUDA 12.8 driver
    from osx.runtime import cuda

    with pytest.raises(OsxError) as e:
        cuda.check_driver()
    assert "supports CUDA up to 12.8" in e.value.message
    assert "driver >= 580" in e.value.hint and ".[tensorrt-cu12]" in e.value.hint
    assert TrtBackend  # the backend runs the same check before any allocation (test_backend_load_path)


def test_profiled_gpu_not_visible_to_cuda(standin):
    from osx.runtime import cuda

    _, rt = standin("10.8.0.43", devices={})
    with pytest.raises(OsxError, match="PCI bus id 00000000:01:00.0 is not visible to CUDA"):
        cuda.select_device(rt, BUS_ID)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["plan", "fp32"])
def test_export_for_a_gpu_builds_strongly_typed_engines(standin, tmp_path, dtype):
    """A user's first run, `osx export --gpu PROFILE`, on TensorRT 11's surface: export, cast, build, manifest.
    By default (--dtype plan) each graph is exported in its engine's type and built as it is, except the
    VAE's (ONNX Conv has no bf16 before opset 22: exported fp32, cast for the build); --dtype fp32 casts all.
    With --dtype fp32 only the text encoder (planned bf16) and denoiser (fp16) are exported: the VAE's graphs and
    checks are the same under both (fp32, cast), so [plan] proves them."""
    calls, _ = standin("11.4.0.106")
    only = [] if dtype == "plan" else ["text_encoder", "denoiser"]
    try:
        main(["export", "--model", "opensora-v1.2-tiny", "--random-weights", "--gpu", _profile(tmp_path / "gpu.toml"),
              "--out", str(tmp_path / "tiny"), *(["--dtype", dtype] if dtype != "plan" else []),
              *(f"--component={n}" for n in only)])
    except SystemExit as e:
        assert e.code in (None, 0)
    b = Bundle.open(tmp_path / "tiny")
    names = only or list(PLANNED)
    assert list(b.components) == names
    for name in names:
        precision = PLANNED[name]
        comp = b.components[name]
        cast = dtype == "fp32" or name in ("vae_decoder", "vae_encoder")  # convolutions: no bf16 at opset 18
        assert comp.precision == ("fp32" if cast else precision)
        assert comp.backend == "tensorrt" and comp.onnx_files == ({precision: f"{name}.{precision}.onnx"} if cast else {})
        assert [e.onnx_file for e in comp.engines] == [f"{name}.{precision}.onnx" if cast else f"{name}.onnx"]
    assert all(strongly for *_, strongly in (c for c in calls if c[0] == "build"))
