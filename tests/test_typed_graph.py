"""fp32 ONNX -> fp16 / bf16 graphs for strongly typed TensorRT engines (osx.export.typed_graph), on the
tiny bundle's graphs: types, I/O, TensorRT lint, values against independent computations."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from osx.bundle import Bundle
from osx.export.lint import lint_onnx
from osx.export.typed_graph import cast_onnx_file

COMPONENTS = ("text_encoder", "denoiser", "vae_decoder")
SIZES = {"latent_frames": 5, "latent_height": 8, "latent_width": 8}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cast_keeps_io_and_passes_the_lint(tiny_bundle, tmp_path, precision):
    b = Bundle.open(tiny_bundle)
    target = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
    for name in COMPONENTS:
        src = b.path(b.components[name].file)
        dst = tmp_path / f"{name}.{precision}.onnx"
        cast_onnx_file(src, dst, precision)
        before, after = onnx.load(src), onnx.load(dst)
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in (*m.graph.input, *m.graph.output)]  # noqa: E731
        assert io(after) == io(before)  # the component's declared I/O is unchanged
        for t_before, t_after in zip(before.graph.initializer, after.graph.initializer):
            if t_before.data_type == onnx.TensorProto.FLOAT and t_after.data_type != onnx.TensorProto.FLOAT:
                assert t_after.data_type == target
                values = numpy_helper.to_array(t_before).copy()
                if precision == "fp16":  # fp16 saturates (e.g. a mask's float32 minimum -> -65504, not -inf)
                    values = np.asarray(np.clip(values, -65504, 65504))
                want = torch.from_numpy(values).to(torch.bfloat16 if precision == "bf16" else torch.float16)
                got = np.frombuffer(t_after.raw_data, np.uint16 if precision == "bf16" else np.float16).reshape(values.shape)
                expected = want.view(torch.int16).numpy().view(np.uint16) if precision == "bf16" else want.numpy()
                np.testing.assert_array_equal(got, expected)  # torch's own rounding, bit for bit
        assert not [i for i in lint_onnx(dst) if i.severity == "error"], name
        if precision == "fp16":  # ONNX's schemas allow fp16 everywhere (bf16 Conv only from opset 22)
            onnx.shape_inference.infer_shapes(after, strict_mode=True, check_type=True)


def test_fp16_graph_computes_what_the_fp32_graph_does(tiny_bundle, tmp_path):
    """onnxruntime on the cast graph vs the fp32 graph: relative L2 within 5e-2 (fp16 has 11 mantissa bits;
    measured 1.5e-3 text encoder, 2.7e-2 denoiser, 1.9e-3 VAE decoder on these random weights)."""
    b = Bundle.open(tiny_bundle)
    for name in COMPONENTS:
        src = b.path(b.components[name].file)
        cast_onnx_file(src, tmp_path / "x.onnx", "fp16")
        spec = b.spec(name)
        inputs = spec.sample_inputs({d: v for d, v in SIZES.items() if d in spec.dims}, seed=3)
        got = ort.InferenceSession(str(tmp_path / "x.onnx"), providers=["CPUExecutionProvider"]).run(None, inputs)
        want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, inputs)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype == np.float32
            assert np.linalg.norm(g - w) / np.linalg.norm(w) < 5e-2, name


def test_external_weights_stream_to_a_data_file(tiny_bundle, tmp_path, monkeypatch):
    import osx.export.typed_graph as typed_graph

    b = Bundle.open(tiny_bundle)
    src = tmp_path / "den.onnx"
    model = onnx.load(b.path("denoiser.onnx"))
    onnx.save_model(model, str(src), save_as_external_data=True, location="den.onnx.data", size_threshold=0)
    monkeypatch.setattr(typed_graph, "EXTERNAL_THRESHOLD", 1)
    written = cast_onnx_file(src, tmp_path / "den.bf16.onnx", "bf16")
    assert [p.name for p in written] == ["den.bf16.onnx", "den.bf16.onnx.data"]
    typed = onnx.load(str(tmp_path / "den.bf16.onnx"))  # loads its external data back
    big = max(typed.graph.initializer, key=lambda t: len(t.raw_data))
    assert big.data_type == onnx.TensorProto.BFLOAT16 and len(big.raw_data) == 2 * int(np.prod(big.dims))
