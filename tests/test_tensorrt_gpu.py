"""TensorRT on a real GPU (`pytest -m gpu`; skipped with the reason elsewhere): build the tiny bundle's
engines with `osx build`, compare every engine with onnxruntime on the same inputs, generate a video
with the tensorrt backend, refuse a load on a mismatched compute capability, and a portable build.

The tiny model's shapes are far below the shipped profiles' buckets, so the test writes a profile for
the GPU it runs on (its compute capability and memory) with two tiny buckets.
"""

import json

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.cli import main
from osx.errors import BundleError
from osx.engine_key import Machine, this_machine

pytestmark = pytest.mark.gpu

BUCKETS = ["64x64x34", "32x32x17"]
COMPONENTS = ("text_encoder", "denoiser", "vae_decoder")


def _profile_toml(path, machine: Machine) -> str:
    cc = machine.compute_capability
    float16 = "bf16" if cc >= (8, 0) else "fp16"
    path.write_text(f"""
name = "test-gpu"
display_name = "{machine.gpu_name}"
compute_capability = "{cc[0]}.{cc[1]}"
vram_gib = 4
reserve_gib = 0.5
workspace_gib = 1
load_one_at_a_time = true
[precision]
text_encoder = "{'bf16' if cc >= (8, 0) else 'fp32'}"
denoiser = "fp16"
vae_decoder = "{float16}"
[shapes]
buckets = {json.dumps(BUCKETS)}
""")
    return str(path)


@pytest.fixture(scope="module")
def machine():
    m = this_machine()
    assert m.compute_capability is not None and "tensorrt" in m.runtimes
    return m


@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory, machine):
    """A copy of the session's tiny bundle (exported for the CPU), then `osx build` on this GPU."""
    import shutil

    root = tmp_path_factory.mktemp("trt")
    bundle = root / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    onnx_only = Bundle.open(bundle).manifest
    profile = _profile_toml(root / "test-gpu.toml", machine)
    main_exit = None
    try:
        main(["build", str(bundle), "--gpu", profile])
    except SystemExit as e:  # main() exits only on errors
        main_exit = e.code
    assert main_exit is None
    return {"bundle": bundle, "profile": profile, "onnx_manifest": onnx_only}


def test_build_writes_engines_with_complete_keys(built, machine):
    b = Bundle.open(built["bundle"])  # checksums of the rebuilt bundle, engines included
    for name in COMPONENTS:
        comp = b.components[name]
        assert comp["backend"] == "tensorrt"
        (entry,) = comp["engines"]
        key = entry["key"]
        assert b.path(entry["file"]).stat().st_size > 0
        assert key["compute_capability"] == machine.cc_text and key["gpu_name"] == machine.gpu_name
        assert key["tensorrt_version"] == machine.runtimes["tensorrt"] and key["hardware_compatibility"] == "none"
        assert key["onnx_sha256"] == b.manifest["files"][entry["onnx_file"]]["sha256"]
        assert entry["runtime"] == "tensorrt"
    assert set(b.components["denoiser"]["engines"][0]["key"]["buckets"]) == set(BUCKETS)
    # the ONNX graphs are still there, unchanged: the bundle also runs on onnxruntime
    for rel, meta in built["onnx_manifest"]["files"].items():
        assert b.manifest["files"][rel]["sha256"] == meta["sha256"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_engine_matches_onnxruntime(built, component):
    """Same inputs through the engine and the fp32 ONNX graph; fp16/bf16 engines are held to a
    relative L2 error of 2e-2 (bf16 has 8 mantissa bits: ~4e-3 per value, accumulated over layers)."""
    from osx.runtime.backend_trt import TrtBackend
    from osx.runtime.backends import OrtBackend

    b = Bundle.open(built["bundle"])
    spec = b.spec(component)
    profile = b.manifest["profile"]
    trt, ort = TrtBackend(b, component), OrtBackend(b, component)
    try:
        for bucket in profile["buckets"]:
            sizes = {d: bucket[d] for d in ("latent_frames", "latent_height", "latent_width") if d in spec.dims}
            if component == "vae_decoder":
                sizes["latent_frames"] = 5
            inputs = spec.sample_inputs(sizes, seed=1)
            got, want = trt.run(inputs), ort.run(inputs)
            for name, ref in want.items():
                ref = ref.astype(np.float32)
                err = np.linalg.norm(got[name] - ref) / max(np.linalg.norm(ref), 1e-6)
                assert got[name].shape == ref.shape and err < 2e-2, f"{component}.{name} at {bucket['name']}: rel L2 {err:.2e}"
    finally:
        trt.release()
        ort.release()
    assert not trt.loaded


def test_generate_with_tensorrt(built, tmp_path):
    out = tmp_path / "video.mp4"
    try:
        main(["generate", str(built["bundle"]), "--prompt", "a red fox in the snow", "--out", str(out),
              "--backend", "tensorrt", "--resolution", "64x64", "--frames", "34", "--steps", "4", "--seed", "7"])
    except SystemExit as e:
        assert e.code in (None, 0)
    assert out.is_file() and out.stat().st_size > 0


def test_generate_matches_onnxruntime(built):
    """The whole pipeline on engines against the same pipeline on the fp32 ONNX graphs: PSNR >= 20 dB
    (a sanity bound: reduced-precision engines through 4 guided steps, not bit parity; a wrong layout,
    profile or dtype gives noise, well under 10 dB)."""
    from osx.runtime.pipeline import Pipeline

    kwargs = dict(num_frames=34, height=64, width=64, steps=4, seed=7)
    trt = Pipeline.load(built["bundle"], "tensorrt")
    ort = Pipeline.load(built["bundle"], "onnxruntime")
    try:
        a = trt.generate("a red fox in the snow", **kwargs).astype(np.float64)
        b = ort.generate("a red fox in the snow", **kwargs).astype(np.float64)
    finally:
        trt.release()
        ort.release()
    assert a.shape == b.shape == (34, 64, 64, 3)
    psnr = 10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12))
    assert psnr >= 20, f"PSNR {psnr:.1f} dB between the TensorRT and onnxruntime videos"


def test_load_refused_on_a_mismatched_compute_capability(built, machine, monkeypatch):
    import osx.runtime.backend_trt as backend_trt

    other = (8, 6) if machine.compute_capability != (8, 6) else (8, 9)
    monkeypatch.setattr(backend_trt, "this_machine",
                        lambda: Machine("Some Other GPU", other, dict(machine.runtimes)))
    b = Bundle.open(built["bundle"])
    with pytest.raises(BundleError) as e:
        backend_trt.TrtBackend(b, "denoiser").load()
    assert f"compute capability {other[0]}.{other[1]}" in e.value.message
    assert f"osx build {built['bundle']} --gpu auto" in e.value.hint


def test_portable_build_loads(built, tmp_path, machine):
    """--portable: Ampere+ and version-compatible; the plan carries its lean runtime."""
    import shutil

    if machine.compute_capability < (8, 0):
        pytest.skip("portable (Ampere+) engines are built on an Ampere or newer GPU")
    from osx.runtime.backend_trt import TrtBackend

    copy = tmp_path / "portable"
    shutil.copytree(built["bundle"], copy)
    try:
        main(["build", str(copy), "--gpu", built["profile"], "--portable"])
    except SystemExit as e:
        assert e.code in (None, 0)
    b = Bundle.open(copy)
    entries = b.components["text_encoder"]["engines"]
    portable = [e for e in entries if e["key"]["version_compatible"]]
    assert len(entries) == 2 and portable and portable[0]["key"]["hardware_compatibility"] == "ampere_plus"
    assert portable[0]["runtime"] == "tensorrt_dispatch"
    # Only the portable engine left: the backend loads it.
    b.manifest["components"]["text_encoder"]["engines"] = portable
    backend = TrtBackend(b, "text_encoder").load()
    try:
        out = backend.run(b.spec("text_encoder").sample_inputs({"batch": 1}, seed=0))
        assert np.isfinite(out["text_embeds"]).all()
    finally:
        backend.release()
