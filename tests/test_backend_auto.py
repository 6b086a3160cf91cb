"""`--backend auto`: OpenVINO (bf16) for a v1.2 CPU bundle's fp32 denoiser where it runs natively, else the manifest.

Only the choice is tested here (no session is built); what each backend computes is tested in
test_backend_openvino.py (within 1e-4 of torch at fp32, cosine >= 0.999 at bf16) and test_runtime_pipeline.py.
"""

from types import SimpleNamespace

import pytest

from osx.bundle import Bundle
from osx.runtime import backends
from osx.runtime.backends import auto_backend, create_backend


def _bundle(family="opensora-v1.2", **components):
    """A stand-in with what auto_backend reads: the family and each component's backend and precision."""
    return SimpleNamespace(manifest=SimpleNamespace(model={"family": family}),
                           components={n: SimpleNamespace(backend=b, precision=p) for n, (b, p) in components.items()})


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_openvino_for_the_fp32_denoiser_only_where_bf16_is_native(monkeypatch, native):
    monkeypatch.setattr(backends, "openvino_has_native_bf16", lambda: native)
    b = _bundle(denoiser=("onnxruntime", "fp32"), text_encoder=("onnxruntime", "fp32"), vae_decoder=("onnxruntime", "fp32"))
    assert auto_backend(b, "denoiser") == ("openvino" if native else "onnxruntime")
    assert auto_backend(b, "text_encoder") == auto_backend(b, "vae_decoder") == "onnxruntime"


@pytest.mark.parametrize("case", [
    {"denoiser": ("onnxruntime", "int8")},  # a quantized graph: the gate judged it on onnxruntime
    {"denoiser": ("tensorrt", "fp16")},  # a GPU bundle keeps its engines
])
def test_auto_keeps_the_manifest_elsewhere(monkeypatch, case):
    monkeypatch.setattr(backends, "openvino_has_native_bf16", lambda: True)
    assert auto_backend(_bundle(**case), "denoiser") == case["denoiser"][0]
    # OpenVINO's bf16 is measured on the v1.2 STDiT3 only
    assert auto_backend(_bundle("opensora-v2.0", denoiser=("onnxruntime", "fp32")), "denoiser") == "onnxruntime"


def test_auto_on_a_real_bundle(tiny_bundle, monkeypatch):
    b = Bundle.open(tiny_bundle, verify=False)
    monkeypatch.setattr(backends, "openvino_has_native_bf16", lambda: False)
    assert {type(create_backend(b, c, "auto")).__name__ for c in b.components} == {"OrtBackend"}
    pytest.importorskip("openvino", reason="the `openvino` extra")
    monkeypatch.setattr(backends, "openvino_has_native_bf16", lambda: True)
    chosen = {c: create_backend(b, c, "auto") for c in b.components}
    assert type(chosen.pop("denoiser")).__name__ == "OvBackend"
    assert {type(x).__name__ for x in chosen.values()} == {"OrtBackend"}


def test_native_bf16_is_what_openvino_reports():
    ov = pytest.importorskip("openvino", reason="the `openvino` extra")
    backends.openvino_has_native_bf16.cache_clear()
    assert backends.openvino_has_native_bf16() == ("BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def test_generate_says_what_auto_chose(tiny_bundle, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from osx.cli import cli

    monkeypatch.setattr(backends, "openvino_has_native_bf16", lambda: False)  # onnxruntime throughout: fast, any CPU
    r = CliRunner().invoke(cli, ["generate", str(tiny_bundle), "--prompt", "a fox", "--backend", "auto", "--steps", "1",
                                  "--out", str(tmp_path / "a.webm"), "--no-verify"])
    assert r.exit_code == 0, r.output
    assert "backend auto: text_encoder onnxruntime, denoiser onnxruntime, vae_decoder onnxruntime" in r.stderr
