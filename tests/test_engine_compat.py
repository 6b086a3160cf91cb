"""Every decision the TensorRT build and backend depend on, tested without a GPU: engine keys, the
load-time compatibility check and its `osx build` command, builder flags, optimisation-profile shapes,
which ONNX an engine builds from, engine selection, bf16 transport, and ComponentEntry.with_engine (`osx build`)."""

import dataclasses

import numpy as np
import pytest
import torch

from osx.components import DimRange
from osx.families import component_specs
from osx.errors import BundleError, OsxError
from osx.export.engines import (
    build_settings, check_build_machine, engine_file, onnx_source, profile_shapes, timing_cache_path,
)
from osx.models import get_model_config
from osx.profiles import load_profile, make_plan
from osx.engine_key import Machine, check_engine_compat, engine_key, pick_profile, select_engine
from osx.manifest import ComponentEntry, EngineEntry, FileEntry, Manifest
from osx.runtime.backend_trt import check_key, from_bfloat16_bits, to_bfloat16_bits

TINY = get_model_config("opensora-v1.2-tiny")
REAL = get_model_config("opensora-v1.2")


def _key(**changes):
    fields = dict(onnx_sha256="a" * 64, tensorrt_version="10.8.0.43", gpu_name="NVIDIA GeForce RTX 4070",
                  compute_capability="8.9", hardware_compatibility="none", version_compatible=False, precision="fp8",
                  calibration_hash="c" * 16, build_flags={"strongly_typed": True},
                  profiles=[{"batch": DimRange(1, 2, 2), "latent_frames": DimRange(15, 15, 15)}],
                  buckets={"240x426x51": 0})
    fields.update(changes)
    return engine_key(**fields)


def _entry(**changes):
    key = _key(**changes)
    return EngineEntry(file=f"engines/denoiser-{key['id']}.plan", key=key, onnx_file="denoiser.fp8.onnx")


RTX4070 = Machine("NVIDIA GeForce RTX 4070", (8, 9), {"tensorrt": "10.8.0.43"})


def test_engine_key_is_complete_and_its_id_tracks_what_matters():
    key = _key()
    for field in ("onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "hardware_compatibility",
                  "version_compatible", "precision", "calibration_hash", "build_flags", "profiles", "buckets"):
        assert field in key
    assert _key()["id"] == key["id"]  # deterministic
    for change in ({"precision": "int8"}, {"onnx_sha256": "b" * 64}, {"tensorrt_version": "10.9.0.34"},
                   {"calibration_hash": None}, {"compute_capability": "8.6"}, {"buckets": {"240x426x102": 0}}):
        assert _key(**change)["id"] != key["id"], change
    assert _key(gpu_name="NVIDIA GeForce RTX 4080")["id"] == key["id"]  # same architecture: same engine


def test_compatible_engine():
    assert check_engine_compat(_entry(), RTX4070, "/b") is None


@pytest.mark.parametrize("entry,machine,match", [
    (_entry(), Machine("NVIDIA GeForce RTX 3090", (8, 6), {"tensorrt": "10.8.0.43"}), "has compute capability 8.6, and the engine runs only on 8.9"),
    (_entry(), Machine("NVIDIA GeForce RTX 4070", (8, 9), {"tensorrt": "10.9.0.34"}), "engines run only on the version that built them"),
    (_entry(hardware_compatibility="ampere_plus", version_compatible=True, precision="int8"),
     Machine("Tesla T4", (7, 5), {"tensorrt": "10.8.0.43"}), "compute capability 7.5 < 8.0"),
    (_entry(hardware_compatibility="ampere_plus", version_compatible=True, precision="int8"),
     Machine("NVIDIA A10G", (8, 6), {"tensorrt_dispatch": "10.7.0.23"}), "runs on TensorRT >= 10.8.0.43"),
])
def test_incompatible_engine_says_the_exact_build_command(entry, machine, match):
    why = check_engine_compat(entry, machine, "/data/my bundle")
    assert why is not None and match in why
    assert "osx build '/data/my bundle' --gpu auto" in why or "upgrade" in why


def test_portable_engine_runs_on_any_ampere_plus_with_a_newer_runtime():
    entry = _entry(hardware_compatibility="ampere_plus", version_compatible=True, precision="int8")
    assert check_engine_compat(entry, Machine("NVIDIA A10G", (8, 6), {"tensorrt_dispatch": "10.9.0.34"})) is None
    assert check_engine_compat(entry, Machine("NVIDIA H100", (9, 0), {"tensorrt_lean": "10.8.0.43"})) is None


def test_missing_runtime_and_missing_gpu():
    assert "pip install tensorrt==10.8.0.43" in check_engine_compat(_entry(), Machine("NVIDIA GeForce RTX 4070", (8, 9), {}))
    assert "no NVIDIA GPU" in check_engine_compat(_entry(), Machine(None, None, {}))
    # the lean runtime cannot load a native engine
    assert "needs the TensorRT runtime package 'tensorrt'" in check_engine_compat(
        _entry(), Machine("NVIDIA GeForce RTX 4070", (8, 9), {"tensorrt_lean": "10.8.0.43"}))


def test_select_engine_prefers_native_and_explains_the_rest():
    native, portable = _entry(), _entry(hardware_compatibility="ampere_plus", version_compatible=True, precision="int8")
    chosen, _ = select_engine([portable, native], RTX4070)
    assert chosen is native
    other = _entry(compute_capability="8.6")
    chosen, reasons = select_engine([other], RTX4070, "/b")
    assert chosen is None and len(reasons) == 1 and "osx build /b --gpu auto" in reasons[0]


def test_check_key_catches_edits_and_stale_onnx():
    entry = _entry()
    manifest = Manifest(model={}, components={}, tokenizer={}, scheduler={}, files={"denoiser.fp8.onnx": FileEntry("a" * 64, 1)})
    check_key(entry, manifest, "denoiser", "/b")
    with pytest.raises(BundleError, match="different denoiser.fp8.onnx"):
        check_key(entry, manifest.replace(files={"denoiser.fp8.onnx": FileEntry("f" * 64, 1)}), "denoiser", "/b")
    edited = EngineEntry(entry.file, {**entry.key, "compute_capability": "8.6"}, entry.onnx_file)
    with pytest.raises(BundleError, match="does not match its own id"):
        check_key(edited, manifest, "denoiser", "/b")


def test_build_settings():
    plan = make_plan(load_profile("rtx4070"), REAL)
    den = build_settings(plan.components["denoiser"])
    assert den["hardware_compatibility"] == "none" and not den["version_compatible"]
    assert den["workspace_bytes"] == int(1.5 * (1 << 30))
    # Every engine strongly typed, with no precision flag (TensorRT 11 has none): the graph carries the types.
    for c in plan.components.values():
        settings = build_settings(c)
        assert settings["strongly_typed"] and settings["precision"] == c.precision
        assert not {"fp16", "bf16", "int8", "fp8"} & set(settings)
    with pytest.raises(OsxError, match="FP8 needs"):
        build_settings(plan.components["denoiser"], portable=True)
    int8 = make_plan(load_profile("rtx3090"), REAL).components["denoiser"]
    portable = build_settings(int8, portable=True)
    assert portable["hardware_compatibility"] == "ampere_plus" and portable["version_compatible"]
    assert not portable["exclude_lean_runtime"]


def test_profile_shapes_follow_the_spec():
    plan = make_plan(load_profile("rtx4070"), REAL)
    spec = component_specs(REAL)["denoiser"]
    den = plan.components["denoiser"]
    shapes = profile_shapes(spec, den.profiles[den.bucket_profile["240x426x51"]])
    assert shapes["x"] == ((1, 4, 15, 30, 53), (2, 4, 15, 30, 53), (2, 4, 15, 30, 53))
    assert shapes["y"] == ((1, 300, 4096), (2, 300, 4096), (2, 300, 4096))
    assert shapes["timestep"] == ((1,), (2,), (2,))
    vae = plan.components["vae_decoder"]
    z = profile_shapes(component_specs(REAL)["vae_decoder"], vae.profiles[0])["z"]
    assert z == ((1, 4, 1, 30, 53), (1, 4, 5, 30, 53), (1, 4, 5, 30, 53))


def test_onnx_source():
    """Strongly typed: the graph's types are the engine's; fp16/bf16 graphs are cast from fp32 if missing."""
    spec = component_specs(TINY)["denoiser"]
    entry = ComponentEntry(file="denoiser.onnx", precision="fp32", io=spec, onnx_files={"fp8": "denoiser.fp8.onnx"})
    assert onnx_source(entry, "fp8") == ("denoiser.fp8.onnx", None)
    assert onnx_source(entry, "fp32") == ("denoiser.onnx", None)
    assert onnx_source(entry, "fp16") == ("denoiser.fp16.onnx", "denoiser.onnx")
    assert onnx_source(entry, "bf16") == ("denoiser.bf16.onnx", "denoiser.onnx")
    typed = dataclasses.replace(entry, onnx_files={**entry.onnx_files, "bf16": "denoiser.bf16.onnx"})
    assert onnx_source(typed, "bf16") == ("denoiser.bf16.onnx", None)  # already in the bundle: reused
    with pytest.raises(OsxError, match="no calibrated int8 QDQ graph"):
        onnx_source(entry, "int8")
    fp16_only = ComponentEntry(file="denoiser.onnx", precision="fp16", io=spec)
    assert onnx_source(fp16_only, "fp16") == ("denoiser.onnx", None)
    with pytest.raises(OsxError, match="no bf16 ONNX graph"):
        onnx_source(fp16_only, "bf16")


def test_build_machine_checks():
    plan = make_plan(load_profile("rtx4070"), REAL)
    check_build_machine(plan, RTX4070, portable=False)
    with pytest.raises(OsxError, match="needs an NVIDIA GPU"):
        check_build_machine(plan, Machine(None, None, {}), portable=False)
    with pytest.raises(OsxError, match="full TensorRT package"):
        check_build_machine(plan, Machine("NVIDIA GeForce RTX 4070", (8, 9), {"tensorrt_lean": "10.8"}), portable=False)
    with pytest.raises(OsxError, match="fp8, which needs compute capability 8.9"):
        check_build_machine(plan, Machine("NVIDIA GeForce RTX 3090", (8, 6), {"tensorrt": "10.8"}), portable=False)


def test_file_names_and_timing_cache(tmp_path):
    key = _key()
    assert engine_file("denoiser", key) == f"engines/denoiser-fp8-{key['id']}.plan"
    cache = timing_cache_path(tmp_path / "bundle", "10.8.0.43", "8.9")
    assert cache.parent == tmp_path and "10.8.0.43" in cache.name and "sm89" in cache.name


def test_pick_profile():
    profiles = [{"latent_height": DimRange(30, 30, 30), "batch": DimRange(1, 2, 2)},
                {"latent_height": DimRange(45, 45, 45), "batch": DimRange(1, 2, 2)}]
    assert pick_profile(profiles, {"latent_height": 45, "batch": 1}) == 1
    assert pick_profile(profiles, {"latent_height": 60, "batch": 2}) is None


def test_bfloat16_transport_matches_torch():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * np.float32(1e3)
    x[:4] = [1.00390625, -0.0, np.inf, 3.0e38]  # a tie to even, signed zero, inf, near the top of the range
    expected = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(from_bfloat16_bits(to_bfloat16_bits(x)), expected)


def test_with_engine_replaces_the_same_target_and_keeps_others():
    old_native, other_gpu = _entry(), _entry(compute_capability="8.6", gpu_name="NVIDIA GeForce RTX 3090")
    comp = ComponentEntry(file="d.onnx", precision="fp32", io=component_specs(TINY)["denoiser"], engines=(old_native, other_gpu))
    new = _entry(onnx_sha256="b" * 64)
    merged = comp.with_engine(new)
    assert merged.engines == (other_gpu, new) and merged.backend == "tensorrt"
    assert comp.engines == (old_native, other_gpu)  # input untouched


def test_lean_runtime_loads_only_plans_of_its_own_version():
    from osx.engine_key import loader_for

    entry = _entry(hardware_compatibility="ampere_plus", version_compatible=True, precision="int8")  # built 10.8.0.43
    a10g = lambda runtimes: Machine("NVIDIA A10G", (8, 6), runtimes)  # noqa: E731
    assert loader_for(entry.key, a10g({"tensorrt_lean": "10.8.0.43"})) == "tensorrt_lean"
    why = check_engine_compat(entry, a10g({"tensorrt_lean": "10.9.0.34"}))
    assert why is not None and "tensorrt_lean of exactly that version" in why and "tensorrt-dispatch>=10.8.0.43" in why
    # the dispatch runtime of a later version loads it (through the lean runtime the plan embeds)
    assert loader_for(entry.key, a10g({"tensorrt_lean": "10.9.0.34", "tensorrt_dispatch": "10.9.0.34"})) == "tensorrt_dispatch"
    assert loader_for(_entry().key, RTX4070) == "tensorrt"


def test_cuda_failures_are_osx_errors_with_a_hint():
    from osx.runtime import cuda

    assert cuda.check((0, 42), "cudaMalloc") == 42
    with pytest.raises(OsxError, match="cudaMalloc failed: 2") as e:
        cuda.check((2, None), "cudaMalloc")
    assert "osx doctor" in e.value.hint
