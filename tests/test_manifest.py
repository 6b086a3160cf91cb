"""The typed manifest: one load (schema check naming the field), one dump, the previous version read, and
per-engine shape limits: a bundle with engines for two GPUs, built for different buckets, accepts on each
(simulated) GPU exactly the shapes of the engine that GPU loads."""

import json
import shutil

import pytest

from osx.bundle import MANIFEST, Bundle, BundleWriter
from osx.engine_key import Machine, engine_key
from osx.errors import BundleError, InputError
from osx.manifest import FORMAT_VERSION, EngineEntry, Manifest, RuntimeSettings, load_manifest
from osx.models import get_model_config
from osx.profiles import Bucket, load_profile, make_plan

TINY = get_model_config("opensora-v1.2-tiny")
GPU_A = Machine("NVIDIA GeForce RTX 4070", (8, 9), {"tensorrt": "10.8.0.43"})
GPU_B = Machine("NVIDIA GeForce RTX 3090", (8, 6), {"tensorrt": "10.8.0.43"})
BUCKET_A, BUCKET_B = Bucket(64, 64, 34), Bucket(128, 128, 17)


def test_round_trip_and_version(tiny_bundle):
    m = load_manifest(tiny_bundle / MANIFEST)
    assert m.format_version == FORMAT_VERSION == 2
    assert Manifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.components["denoiser"].file_of("null_text_file") == "null_text.npy"
    assert m.components["denoiser"].io.dims == Bundle.open(tiny_bundle).spec("denoiser").dims
    assert m.runtime.cfg_batching and "plan" in m.to_dict() and "profile" not in m.to_dict()
    # the graph fused for onnxruntime is a typed field: written, read back, referenced and checksummed
    fused = m.components["denoiser"].onnxruntime_file
    assert fused == "denoiser.ort.onnx" and m.to_dict()["components"]["denoiser"]["onnxruntime_file"] == fused
    assert "onnxruntime_file" not in m.components["denoiser"].files and fused in m.components["denoiser"].referenced_files()
    assert m.files[fused].bytes == (tiny_bundle / fused).stat().st_size and m.components["vae_decoder"].onnxruntime_file is None


def test_version_1_is_read_and_unknown_versions_refused(tiny_bundle):
    d = load_manifest(tiny_bundle / MANIFEST).to_dict()
    v1 = {k: v for k, v in d.items() if k not in ("plan", "runtime")}
    v1.update(format_version=1, profile={"name": "rtx4070", "load_one_at_a_time": True, "cfg_batching": False})
    m = Manifest.from_dict(v1, "old")
    assert m.format_version == 2 and m.runtime.load_one_at_a_time and not m.runtime.cfg_batching
    assert m.plan["name"] == "rtx4070"
    with pytest.raises(BundleError, match="format version 3 is not supported") as e:
        Manifest.from_dict({**d, "format_version": 3}, "new")
    assert "osx export" in e.value.hint


def _engines_for(bucket: Bucket, machine: Machine, one_at_a_time: bool) -> dict[str, EngineEntry]:
    """Engine entries as `osx build` writes them, for a plan of `bucket` on `machine` (the file is a stand-in)."""
    plan = make_plan(load_profile("rtx4070").with_changes(buckets=(bucket,), load_one_at_a_time=one_at_a_time), TINY)
    out = {}
    for name in ("denoiser", "vae_decoder"):
        c = plan.components[name]
        key = engine_key(onnx_sha256="0" * 64, tensorrt_version=machine.runtimes["tensorrt"], gpu_name=machine.gpu_name,
                         compute_capability=machine.cc_text, hardware_compatibility="none", version_compatible=False,
                         precision="fp16", calibration_hash=None, build_flags={}, profiles=c.profiles, buckets=c.bucket_profile)
        out[name] = EngineEntry(file=f"engines/{name}-{key['id']}.plan", key=key, load_one_at_a_time=one_at_a_time)
    return out


@pytest.fixture(scope="module")
def two_gpu_bundle(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_gpus") / "bundle"
    manifest = Bundle.open(tiny_bundle).manifest
    with BundleWriter(out) as w:
        for rel in manifest.files:
            (w.dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tiny_bundle / rel, w.dir / rel)
        components = dict(manifest.components)
        for engines in (_engines_for(BUCKET_A, GPU_A, False), _engines_for(BUCKET_B, GPU_B, True)):
            for name, entry in engines.items():
                (w.dir / "engines").mkdir(exist_ok=True)
                (w.dir / entry.file).write_bytes(b"plan")
                components[name] = components[name].with_engine(entry)
        w.commit(manifest.replace(components=components, runtime=RuntimeSettings(load_one_at_a_time=False)))
    return out


@pytest.mark.parametrize("machine,own,other,one_at_a_time", [(GPU_A, BUCKET_A, BUCKET_B, False),
                                                             (GPU_B, BUCKET_B, BUCKET_A, True)])
def test_each_gpu_accepts_its_own_buckets_only(two_gpu_bundle, monkeypatch, machine, own, other, one_at_a_time):
    from osx.runtime import backend_trt
    from osx.runtime.pipeline import Pipeline

    monkeypatch.setattr(backend_trt, "this_machine", lambda: machine)
    bundle = Bundle.open(two_gpu_bundle)
    assert [len(bundle.components[n].engines) for n in ("text_encoder", "denoiser", "vae_decoder")] == [0, 2, 2]
    pipe = Pipeline.load(bundle)  # text encoder on onnxruntime, denoiser and VAE on TensorRT: nothing loaded yet
    assert pipe.buckets == [(own.height, own.width, own.frames)] and pipe.load_one_at_a_time is one_at_a_time
    r = pipe.prepare_request("a fox")  # the default: this engine's bucket
    assert (r.height, r.width, r.num_frames) == (own.height, own.width, own.frames)
    with pytest.raises(InputError, match=f"{other.width}x{other.height} \\(WxH\\) with {other.frames} frames") as e:
        pipe.prepare_request("a fox", height=other.height, width=other.width, num_frames=other.frames)
    assert f"{own.width}x{own.height} (WxH) with {own.frames} frames" in e.value.hint
    # onnxruntime on the same bundle runs the ONNX ranges: both shapes
    ort = Pipeline.load(bundle, "onnxruntime")
    for b in (own, other):
        ort.prepare_request("a fox", height=b.height, width=b.width, num_frames=b.frames)
