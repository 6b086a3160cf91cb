"""The OpenVINO backend (`--backend openvino` / `openvino-fp32`) on the tiny bundle vs the torch reference.

Tolerances: openvino-fp32's denoiser within the export tolerance of the torch STDiT3 (1e-4 relative, max
abs error over max abs value, as the export validates; measured 3.1e-5); openvino (bf16 on CPUs with native
bf16) within cosine >= 0.999 and relative L2 <= 3e-2 of it at t = 999, where the Sin/Cos phases kept fp32
matter most (measured on an AMX CPU: cosine 0.99993, relative L2 0.012; without the fp32 phases 0.785 and
0.645: asserted at least 3x worse).
"""

import sys

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.errors import OsxError
from osx.runtime.backends import create_backend

ov = pytest.importorskip("openvino", reason="the `openvino` extra")
torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
NATIVE_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def case(tiny_bundle):
    """Denoiser inputs at t = 999 (batch 2, 4 latent frames of 8x8) and the torch reference's output."""
    from osx.export.reference import build_reference

    b = Bundle.open(tiny_bundle, verify=False)
    rng = np.random.default_rng(0)
    cfg = b.model_config()
    mask = np.zeros((2, cfg.text_encoder.max_length), np.int64)
    mask[:, :5] = 1
    feed = {"x": rng.standard_normal((2, 4, 4, 8, 8)).astype(np.float32), "timestep": np.full(2, 999.0, np.float32),
            "y": rng.standard_normal((2, mask.shape[1], cfg.denoiser.caption_channels)).astype(np.float32),
            "mask": mask, "fps": np.full(2, 24.0, np.float32), "height": np.full(2, 64.0, np.float32),
            "width": np.full(2, 64.0, np.float32), "x_mask": np.ones((2, 4), np.float32)}
    model = build_reference(cfg).denoiser
    with torch.no_grad():
        want = model(*(torch.from_numpy(feed[k]) for k in feed))[:, :4].numpy()
    return b, feed, want, model


def cosine(a, b):
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fp32_within_the_export_tolerance_of_torch(case):
    b, feed, want, _ = case
    backend = create_backend(b, "denoiser", "openvino-fp32")
    got = backend.run(feed)["v"]
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert backend.path.name == "denoiser.onnx"  # the portable graph, not onnxruntime's fused one
    # compiled per shape (static): a second shape gets its own compiled model, still within the tolerance
    small = {k: v[:1, :, :2] if k == "x" else v[:1, :2] if k == "x_mask" else v[:1] for k, v in feed.items()}
    with torch.no_grad():
        model = case[3]
        want_small = model(*(torch.from_numpy(small[k]) for k in small))[:, :4].numpy()
    got_small = backend.run(small)["v"]
    assert np.abs(got_small - want_small).max() / np.abs(want_small).max() < 1e-4
    assert len(backend.requests) == 1  # the first shape's compiled model was let go


def test_bf16_close_to_torch_and_phases_kept_fp32(case, monkeypatch):
    b, feed, want, _ = case
    backend = create_backend(b, "denoiser", "openvino")
    assert backend.precision == "bf16" and create_backend(b, "vae_decoder", "openvino").precision == "fp32"
    got = backend.run(feed)["v"]
    assert backend.runs_at == ("bf16" if NATIVE_BF16 else "fp32")
    assert cosine(got, want) >= 0.999 and rel_l2(got, want) <= 3e-2, (cosine(got, want), rel_l2(got, want))
    if not NATIVE_BF16:
        pytest.skip("this CPU has no native bf16: OpenVINO runs the bf16 hint at fp32")
    from osx.runtime import backend_ov

    monkeypatch.setattr(backend_ov, "keep_phases_fp32", lambda core, model, tmp: model)
    unmarked = create_backend(b, "denoiser", "openvino").run(feed)["v"]
    assert rel_l2(unmarked, want) > 3 * rel_l2(got, want), (rel_l2(unmarked, want), rel_l2(got, want))


def test_missing_extra_is_a_clear_error(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.delitem(sys.modules, "osx.runtime.backend_ov", raising=False)
    with pytest.raises(OsxError, match="not available") as e:
        create_backend(Bundle.open(tiny_bundle, verify=False), "denoiser", "openvino")
    assert ".[openvino]" in e.value.hint
