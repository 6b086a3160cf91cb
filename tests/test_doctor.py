"""`osx doctor`: the report on this machine, and on machines described by probed facts (GPU or not,
full TensorRT or only its lean runtime, a bundle whose engines do or do not fit)."""

import subprocess
import sys

from osx.commands.doctor import gather_facts, report
from osx.families import component_specs
from osx.engine_key import engine_key
from osx.manifest import ComponentEntry, EngineEntry, Manifest
from osx.models import get_model_config

GIB = 1 << 30


def _facts(gpu=None, tensorrt=None):
    return {
        "osx": "0.1.0", "python": "3.11", "platform": "Linux",
        "gpus": [gpu] if gpu else [], "gpu_problems": [] if gpu else ["NVML: NVMLError_LibraryNotFound"],
        "tensorrt": tensorrt or {}, "cuda_python": "12.8.0" if gpu else None, "cuda_runtime": "12.8" if gpu else None,
        "polygraphy": "0.53.6", "onnxruntime": "1.32.0", "onnxruntime_providers": ["CPUExecutionProvider"],
    }


RTX4070 = {"name": "NVIDIA GeForce RTX 4070", "compute_capability": "8.9", "memory_bytes": 12282 << 20,
           "driver": "570.86", "cuda_driver": "12.8"}


def test_doctor_runs_here():
    out = subprocess.run([sys.executable, "-m", "osx", "doctor"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    facts = gather_facts()
    assert f"onnxruntime: {facts['onnxruntime']}" in out.stdout and "this machine can:" in out.stdout
    if facts["gpus"]:
        assert facts["gpus"][0]["name"] in out.stdout
    else:
        assert "GPU: none found" in out.stdout and "NOT run TensorRT engines: no NVIDIA GPU" in out.stdout


def test_report_no_gpu():
    lines, ok = report(_facts())
    text = "\n".join(lines)
    assert ok and "GPU: none found (NVML" in text and "run bundles on the CPU" in text and "no NVIDIA GPU" in text


def test_report_gpu_with_full_tensorrt():
    text = "\n".join(report(_facts(RTX4070, {"tensorrt": "10.8.0.43"}))[0])
    assert "GPU 0: NVIDIA GeForce RTX 4070, compute capability 8.9, 12.0 GiB, driver 570.86 (CUDA 12.8)" in text
    assert "TensorRT: tensorrt 10.8.0.43" in text
    assert "build TensorRT engines here" in text and "fp8" in text
    assert "using profile rtx4070" in text and "with --gpu rtx4070" in text and "fits" in text


def test_report_gpu_without_or_with_lean_tensorrt():
    assert "NOT run TensorRT engines: pip install -e '.[tensorrt]'" in "\n".join(report(_facts(RTX4070))[0])
    lean = "\n".join(report(_facts(RTX4070, {"tensorrt_dispatch": "10.8.0.43"}))[0])
    assert "run portable (version-compatible) engines only" in lean


def _entry(cc="8.9", trt="10.8.0.43", portable=False):
    key = engine_key(onnx_sha256="a" * 64, tensorrt_version=trt, gpu_name="NVIDIA GeForce RTX 4070", compute_capability=cc,
                     hardware_compatibility="ampere_plus" if portable else "none", version_compatible=portable,
                     precision="fp16", calibration_hash=None, build_flags={}, profiles=[], buckets={})
    return EngineEntry(file=f"engines/denoiser-{key['id']}.plan", key=key, runtime="tensorrt_dispatch" if portable else "tensorrt")


def _manifest(*entries):
    specs = component_specs(get_model_config("opensora-v1.2-tiny"))
    return Manifest(model={}, tokenizer={}, scheduler={}, components={
        "text_encoder": ComponentEntry(file="t.onnx", precision="fp32", io=specs["text_encoder"]),
        "denoiser": ComponentEntry(file="d.onnx", precision="fp16", io=specs["denoiser"], backend="tensorrt", engines=entries)})


def test_report_bundle_engines():
    facts = _facts(RTX4070, {"tensorrt": "10.8.0.43"})
    lines, ok = report(facts, manifest=_manifest(_entry()), bundle="/data/b")
    assert ok and any("denoiser: ok" in line for line in lines)
    lines, ok = report(facts, manifest=_manifest(_entry(cc="8.6")), bundle="/data/b")
    text = "\n".join(lines)
    assert not ok and "denoiser: cannot run here" in text and "osx build /data/b --gpu auto" in text
    # A portable engine needs only the dispatch runtime, at its build version or later.
    lines, ok = report(_facts(RTX4070, {"tensorrt_dispatch": "10.9.0.34"}), manifest=_manifest(_entry(portable=True)))
    assert ok
