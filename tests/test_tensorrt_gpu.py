"""TensorRT on a real GPU (`pytest -m gpu`; skipped with the reason elsewhere): build the tiny bundle's
engines with `osx build` (strongly typed: fp32 graphs cast to the plan's bf16/fp16), compare every engine
with onnxruntime on the same inputs, generate a video with the tensorrt backend, refuse a load on a
mismatched compute capability, a portable build, INT8/FP8 builds of calibrated Q/DQ graphs, fp16/bf16 I/O
engines, a shipped profile's plan on the tiny model, and `--gpu auto`. Open-Sora v2.0: every component of the
tiny t2i bundle built and compared, the transformers built streamable and run with the plan's budget, and
PipelineV2's text -> image -> video on TensorRT against onnxruntime.

The tiny model's shapes are far below the shipped profiles' buckets, so the test writes a profile for
the GPU it runs on (its compute capability and memory) with two tiny buckets.
"""

import dataclasses
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


def _profile_toml(path, machine: Machine, denoiser: str = "fp16", buckets=BUCKETS) -> str:
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
denoiser = "{denoiser}"
vae_decoder = "{float16}"
[shapes]
buckets = {json.dumps(list(buckets))}
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
        assert comp.backend == "tensorrt"
        (entry,) = comp.engines
        key = entry.key
        assert b.path(entry.file).stat().st_size > 0
        assert key["compute_capability"] == machine.cc_text and key["gpu_name"] == machine.gpu_name
        assert key["tensorrt_version"] == machine.runtimes["tensorrt"] and key["hardware_compatibility"] == "none"
        assert key["onnx_sha256"] == b.manifest.files[entry.onnx_file].sha256
        assert entry.runtime == "tensorrt"
    assert set(b.components["denoiser"].engines[0].key["buckets"]) == set(BUCKETS)
    # the ONNX graphs are still there, unchanged: the bundle also runs on onnxruntime
    for rel, meta in built["onnx_manifest"].files.items():
        assert b.manifest.files[rel].sha256 == meta.sha256


@pytest.mark.parametrize("component", COMPONENTS)
def test_engine_matches_onnxruntime(built, component):
    """Same inputs through the engine and the fp32 ONNX graph; fp16/bf16 engines are held to a relative
    L2 error of 5e-2 (the plain fp16 cast of the tiny denoiser measured 2.7e-2 on onnxruntime's CPU; bf16
    has 8 mantissa bits: ~4e-3 per value, accumulated over layers)."""
    from osx.runtime.backend_trt import TrtBackend
    from osx.runtime.backends import OrtBackend

    b = Bundle.open(built["bundle"])
    spec = b.spec(component)
    trt, ort = TrtBackend(b, component), OrtBackend(b, component)
    try:
        for dims in trt.limits():  # each optimisation profile of the engine this GPU loads, at its largest
            sizes = {d: r.max for d, r in dims.items() if d != "batch"}
            bucket = {"name": " ".join(f"{d}={n}" for d, n in sizes.items())}
            inputs = spec.sample_inputs(sizes, seed=1)
            got, want = trt.run(inputs), ort.run(inputs)
            for name, ref in want.items():
                ref = ref.astype(np.float32)
                err = np.linalg.norm(got[name] - ref) / max(np.linalg.norm(ref), 1e-6)
                assert got[name].shape == ref.shape and err < 5e-2, f"{component}.{name} at {bucket['name']}: rel L2 {err:.2e}"
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
    psnr = _psnr_vs_onnxruntime(built["bundle"], "tensorrt", (34, 64, 64, 3), num_frames=34, height=64, width=64, steps=4, seed=7)
    assert psnr >= 20, f"PSNR {psnr:.1f} dB between the TensorRT and onnxruntime videos"


def _psnr_vs_onnxruntime(bundle, backend, shape, **kwargs) -> float:
    """PSNR (dB) between the video of `bundle` on `backend` (None: the manifest's) and on onnxruntime's fp32 graphs."""
    from osx.runtime.pipeline import Pipeline

    trt, ort = Pipeline.load(bundle, backend), Pipeline.load(bundle, "onnxruntime")
    try:
        a = trt.generate("a red fox in the snow", **kwargs).astype(np.float64)
        b = ort.generate("a red fox in the snow", **kwargs).astype(np.float64)
    finally:
        trt.release()
        ort.release()
    assert a.shape == b.shape == shape
    return 10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12))


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
    entries = b.components["text_encoder"].engines
    portable = tuple(e for e in entries if e.key["version_compatible"])
    assert len(entries) == 2 and portable and portable[0].key["hardware_compatibility"] == "ampere_plus"
    assert portable[0].runtime == "tensorrt_dispatch"
    # Only the portable engine left: the backend loads it.
    b.manifest.components["text_encoder"] = dataclasses.replace(b.components["text_encoder"], engines=portable)
    backend = TrtBackend(b, "text_encoder").load()
    try:
        out = backend.run(b.spec("text_encoder").sample_inputs({"batch": 1}, seed=0))
        assert np.isfinite(out["text_embeds"]).all()
    finally:
        backend.release()


# --- strongly typed builds from typed graphs ------------------------------------------------------------


def _rel_l2(got: dict, want: dict) -> float:
    return max(float(np.linalg.norm(got[n] - want[n].astype(np.float32)) / max(np.linalg.norm(want[n]), 1e-6))
               for n in want)


def _run_both(bundle, component, reference_bundle=None, seed=3):
    """The engine's outputs and onnxruntime's (on `reference_bundle`'s graph if given) at the first bucket."""
    from osx.runtime.backend_trt import TrtBackend
    from osx.runtime.backends import OrtBackend

    b = Bundle.open(bundle)
    ref = Bundle.open(reference_bundle) if reference_bundle else b
    spec = b.spec(component)
    trt, ort = TrtBackend(b, component), OrtBackend(ref, component)
    first = trt.limits()[0]  # the engine's first optimisation profile, at its largest
    inputs = spec.sample_inputs({d: r.max for d, r in first.items() if d != "batch"}, seed=seed)
    try:
        return trt.run(inputs), ort.run(inputs), trt
    finally:
        trt.release()
        ort.release()


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_engine_from_the_calibrated_qdq_graph(precision, machine, tmp_path_factory):
    """`osx export --calibration` for this GPU: the denoiser's engine is built strongly typed from the Q/DQ
    graph (ModelOpt, fp16 outside Q/DQ) and agrees with onnxruntime on that graph within 5e-2 (same
    quantization; TensorRT's kernels accumulate differently)."""
    from osx.calibration import quantize

    if precision == "fp8" and machine.compute_capability < (8, 9):
        pytest.skip(f"FP8 needs compute capability >= 8.9; this GPU ({machine.gpu_name}) has {machine.cc_text}")
    if quantize.modelopt_available() is not None:
        pytest.skip(f"TensorRT INT8/FP8 graphs come from NVIDIA ModelOpt: {quantize.modelopt_available()}")
    from osx.calibration.capture import capture
    from osx.export.reference import build_reference
    from osx.models import OPENSORA_V1_2_TINY as TINY
    from test_calibration import _recipe

    root = tmp_path_factory.mktemp(f"trt-{precision}")
    calib = capture(build_reference(TINY, seed=0), root / "calib", _recipe())
    profile = _profile_toml(root / "q.toml", machine, denoiser=precision, buckets=["32x32x17", "64x64x34"])
    try:
        main(["export", "--model", "opensora-v1.2-tiny", "--random-weights", "--gpu", profile, "--calibration",
              str(calib.root), "--gate-min-psnr", "12", "--out", str(root / "bundle")])
    except SystemExit as e:
        assert e.code in (None, 0)
    entry = Bundle.open(root / "bundle").components["denoiser"]
    (engine,) = entry["engines"]
    assert engine["key"]["precision"] == precision and engine["onnx_file"] == entry["file"]
    assert engine["key"]["build_flags"]["strongly_typed"]
    got, want, _ = _run_both(root / "bundle", "denoiser")
    assert _rel_l2(got, want) < 5e-2


@pytest.mark.parametrize("dtype,host", [("fp16", np.float16), ("bf16", np.uint16)])
def test_engine_with_16_bit_io(dtype, host, machine, tiny_bundle, tmp_path_factory):
    """A bundle exported in fp16 / bf16 builds engines whose I/O is 16-bit (bf16 travels as raw bits):
    the denoiser agrees with the fp32 bundle's onnxruntime graph (same seeded weights) within 5e-2."""
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    if dtype == "bf16" and machine.compute_capability < (8, 0):
        pytest.skip(f"bf16 needs compute capability >= 8.0; this GPU ({machine.gpu_name}) has {machine.cc_text}")
    root = tmp_path_factory.mktemp(f"io-{dtype}")
    try:
        export_bundle(ExportRequest("opensora-v1.2-tiny", root / "b", RANDOM_WEIGHTS, gpu="cpu", dtype=dtype, progress=lambda m: None))
    except Exception as e:  # the exporter's own limits (onnxruntime's CPU validation of bf16 graphs)
        pytest.skip(f"exporting the tiny model in {dtype} is not available here: {type(e).__name__}: {e}")
    profile = _profile_toml(root / "io.toml", machine, denoiser=dtype)
    try:
        main(["build", str(root / "b"), "--gpu", profile])
    except SystemExit as e:
        assert e.code in (None, 0)
    got, want, backend = _run_both(root / "b", "denoiser", reference_bundle=tiny_bundle)
    assert backend.host_dtypes["x"] == host
    assert _rel_l2(got, want) < 5e-2


def test_a_shipped_profiles_plan_on_the_tiny_model(machine, tiny_bundle, tmp_path):
    """The shipped profile `--gpu auto` picks for this GPU, with its precisions, policies and CPU components
    kept and only its buckets replaced by tiny ones: built, and a video generated on TensorRT."""
    import shutil

    from osx.profiles import detect_profile

    shipped, _ = detect_profile()
    lines = [f'name = "{shipped.name}-tiny"', f'display_name = "{shipped.display_name}"',
             f'compute_capability = "{shipped.cc_text}"', f"vram_gib = {shipped.vram_gib}", f"reserve_gib = {shipped.reserve_gib}",
             f"workspace_gib = {shipped.workspace_gib}", f"load_one_at_a_time = {str(shipped.load_one_at_a_time).lower()}",
             f"cpu_components = {json.dumps(list(shipped.cpu_components))}", "[precision]"]
    lines += [f'{c} = "{"fp16" if p in ("int8", "fp8") else p}"' for c, p in shipped.precision.items()
              if c != "vae_encoder"]  # INT8/FP8 need a calibration run: covered above
    lines += ["[shapes]", f"buckets = {json.dumps(BUCKETS)}", f"cfg_batching = {str(shipped.cfg_batching).lower()}"]
    (tmp_path / "p.toml").write_text("\n".join(lines) + "\n")
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    for argv in (["build", str(bundle), "--gpu", str(tmp_path / "p.toml")],
                 ["generate", str(bundle), "--prompt", "a red fox", "--out", str(tmp_path / "v.mp4"), "--backend",
                  "tensorrt", "--resolution", "64x64", "--frames", "34", "--steps", "2", "--seed", "1"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code in (None, 0), argv
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_gpu_auto(machine, tiny_bundle, tmp_path, capsys):
    """--gpu auto names this GPU's profile; on the tiny bundle the shipped buckets are refused clearly."""
    import shutil

    try:
        main(["export", "--model", "opensora-v1.2", "--gpu", "auto", "--dry-run"])
    except SystemExit as e:
        assert e.code in (None, 0)
    assert machine.gpu_name in capsys.readouterr().out
    shutil.copytree(tiny_bundle, tmp_path / "b")
    with pytest.raises(SystemExit) as e:
        main(["build", str(tmp_path / "b"), "--gpu", "auto"])
    assert e.value.code == 2 and "outside the sizes" in capsys.readouterr().err


# --- Open-Sora v2.0 (the tiny t2i bundle: T5, CLIP, MMDiT, VAE decoder and encoder, Flux.1-dev and its AE) ----------


@pytest.fixture(scope="module")
def built_v2(tiny_t2i_bundle, tmp_path_factory, machine):
    """Copies of the tiny v2.0 t2i bundle built on this GPU: every component on TensorRT ("whole"), and with the
    transformers streamed (test_trt_v2.STREAMED: a 1 MB card, the VAEs on the CPU)."""
    import shutil

    from test_trt_v2 import STREAMED, _profile as v2_profile

    if machine.compute_capability < (8, 0):
        pytest.skip(f"the v2.0 test profiles use bf16 (cc >= 8.0); this GPU ({machine.gpu_name}) has {machine.cc_text}")
    root, out = tmp_path_factory.mktemp("trt-v2"), {}
    for kind, options in (("whole", {}), ("streamed", STREAMED)):
        bundle = root / kind
        shutil.copytree(tiny_t2i_bundle, bundle)
        profile = v2_profile(root / f"{kind}.toml", gpu_name=machine.gpu_name, cc=machine.cc_text, **options)
        try:
            main(["build", str(bundle), "--gpu", profile])
        except SystemExit as e:
            assert e.code in (None, 0)
        out[kind] = bundle
    return out


V2_COMPONENTS = ("text_encoder", "clip", "denoiser", "vae_decoder", "vae_encoder", "t2i_denoiser", "t2i_decoder")


@pytest.mark.parametrize("component", V2_COMPONENTS)
def test_v2_engine_matches_onnxruntime(built_v2, component):
    """Each v2.0 engine (bf16; the MMDiT fp16) against the fp32 graph on onnxruntime at every profile's largest
    shape: relative L2 within 5e-2, as the v1.2 engines (16-bit types through a few tiny layers)."""
    b = Bundle.open(built_v2["whole"])
    (engine,) = b.components[component].engines
    assert engine.key["build_flags"]["strongly_typed"] and "weight_streaming_budget" not in engine.key["build_flags"]
    got, want, _ = _run_both(built_v2["whole"], component)
    assert _rel_l2(got, want) < 5e-2


@pytest.mark.parametrize("component", ["denoiser", "t2i_denoiser"])
def test_v2_streamed_engine_keeps_the_plans_budget(built_v2, component):
    """The streamed transformers: TensorRT built them streamable, took the plan's budget (at most its streamable
    bytes) before the context, and computes what onnxruntime does within the same 5e-2 (streaming moves weights,
    not numbers)."""
    from osx.runtime.backend_trt import TrtBackend

    b = Bundle.open(built_v2["streamed"])
    (engine,) = b.components[component].engines
    budget = engine.key["build_flags"]["weight_streaming_budget"]
    with TrtBackend(b, component) as backend:
        streamable = backend.engine.streamable_weights_size
        assert streamable > 0 and backend.engine.weight_streaming_budget_v2 == min(budget, streamable)
        assert backend.weight_streaming["streamed_bytes"] == streamable - min(budget, streamable)
    got, want, _ = _run_both(built_v2["streamed"], component)
    assert _rel_l2(got, want) < 5e-2


@pytest.mark.parametrize("kind", ["whole", "streamed"])
def test_v2_generate_matches_onnxruntime(built_v2, kind):
    """PipelineV2 text -> image -> video on the engines (streamed: the MMDiT and Flux with the plan's budgets, the
    VAEs on onnxruntime) against the same run on the fp32 ONNX graphs: PSNR >= 20 dB (a sanity bound, as v1.2's)."""
    psnr = _psnr_vs_onnxruntime(built_v2[kind], None, (5, 96, 96, 3), seed=7, steps=3, resolution="96px", aspect_ratio="1:1",
                                num_frames=5, t2i2v=True, t2i_steps=2)  # 96 px: 2x2 VAE tiles, the second short
    assert psnr >= 20, f"PSNR {psnr:.1f} dB between the TensorRT and onnxruntime videos ({kind})"
