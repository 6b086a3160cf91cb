"""export_component / validate_component on a small module with the shapes that matter (dynamic batch,
frames, height, width; a key-padding mask; a multiple-of-k output dim), so each export takes seconds.
The real components are exported and validated by the session `tiny_bundle` (tests/test_exporter.py)."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from osx.components import ComponentSpec, DimRange, TensorSpec
from osx.errors import ValidationError
from osx.export.onnx_export import export_component
from osx.export.validate import (
    TOLERANCE, Case, format_table, fp16_noise, fp16_tolerance, validate_component, validation_shapes,
)

SPEC = ComponentSpec(
    name="toy",
    inputs=(
        TensorSpec("x", "float", ("batch", 4, "frames", "height", "width")),
        TensorSpec("y", "float", ("batch", 6, 16)),
        TensorSpec("mask", "int64", ("batch", 6), "prefix_mask"),
    ),
    outputs=(TensorSpec("out", "float", ("batch", 4, "2*frames", "height", "width")),),
    dims={"batch": DimRange(1, 2, 2), "frames": DimRange(1, 3, 5), "height": DimRange(1, 4, 9), "width": DimRange(1, 4, 9)},
)


class Toy(nn.Module):
    """Conv, masked cross-attention over y, a transpose-reshape (the guard torch.export cannot prove at
    frames == 1) and a 2x frame upsampling: the constructs of the real components, small."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(4, 8, 3, padding=1)
        self.kv = nn.Linear(16, 16)
        self.out = nn.Linear(8, 8)

    def forward(self, x, y, mask):
        B, _, T, H, W = x.shape
        h = self.conv(x).flatten(2).transpose(1, 2)  # [B, T*H*W, 8]
        k, v = self.kv(y)[:, None].chunk(2, dim=-1)  # one head: [B, 1, 6, 8]
        bias = ((mask.to(h.dtype) - 1) * 1e4)[:, None, None, :]
        h = h + F.scaled_dot_product_attention(h[:, None], k, v, attn_mask=bias)[:, 0]
        h = h.reshape(B, T, H * W, 8).transpose(1, 2).reshape(B * H * W, T, 8)  # frames as the sequence
        h = self.out(h).reshape(B, H, W, T * 2, 4).permute(0, 4, 3, 1, 2)
        return h


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    module = Toy()
    info = export_component(module, SPEC, path)
    return module, path, info


def test_graph_is_the_spec_and_passes_the_full_checker(exported):
    module, path, info = exported
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["x", "y", "mask"]
    assert [o.name for o in model.graph.output] == ["out"]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims["x"] == ["batch", 4, "frames", "height", "width"]
    assert dims["out"] == ["batch", 4, "2xframes", "height", "width"]
    assert model.opset_import[0].version == 18
    assert info.data_file is None and not (path.parent / "toy.onnx.data").exists()
    # op counts as recorded = counted from the file
    assert info.op_counts == dict(Counter(n.op_type for n in model.graph.node))
    assert info.nodes == len(model.graph.node) and info.bytes == path.stat().st_size


def test_axes_are_dynamic_and_match_torch(exported):
    """onnxruntime at sizes other than the traced ones (each dim at its min and max), against torch."""
    module, path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for sizes in ({"batch": 1, "frames": 1, "height": 1, "width": 1}, {"batch": 2, "frames": 5, "height": 9, "width": 2}):
        inputs = SPEC.sample_inputs(sizes, seed=3)
        got = session.run(None, inputs)[0]
        with torch.no_grad():
            want = module(*(torch.from_numpy(inputs[t.name]) for t in SPEC.inputs)).numpy()
        assert got.shape == want.shape == (sizes["batch"], 4, 2 * sizes["frames"], sizes["height"], sizes["width"])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_validation_two_shapes_within_tolerance(exported):
    module, path, _ = exported
    shapes = validation_shapes(SPEC)
    assert len(shapes) == 2 and shapes[0] == {d: r.min for d, r in SPEC.dims.items()}
    assert all(shapes[0][d] != shapes[1][d] for d in SPEC.dims)  # every dynamic dim takes two sizes
    rows = validate_component(module, path, SPEC, shapes, "fp32")
    assert len(rows) == 2 and all(r["ok"] and r["max_rel"] <= TOLERANCE["fp32"] for r in rows)
    assert "toy" in format_table(rows) and "ok" in format_table(rows)


def test_validation_fails_when_a_weight_changes_after_tracing(tmp_path):
    module = Toy()
    path = tmp_path / "toy.onnx"
    export_component(module, SPEC, path)
    with torch.no_grad():
        module.out.weight[0, 0] += 1.0  # the graph keeps the traced value; torch now differs
    with pytest.raises(ValidationError, match=r"toy: ONNX output 'out' differs from PyTorch by .* tolerance 0.0001") as e:
        validate_component(module, path, SPEC, validation_shapes(SPEC), "fp32")
    assert any(not r["ok"] for r in e.value.rows)


def test_external_data_when_over_the_threshold(tmp_path):
    """The threshold (2 GB for real models) forced down: weights go to one .data file beside the graph."""
    module = Toy()
    path = tmp_path / "toy.onnx"
    info = export_component(module, SPEC, path, external_data_threshold=0)
    assert info.data_file == "toy.onnx.data" and sorted(p.name for p in tmp_path.iterdir()) == ["toy.onnx", "toy.onnx.data"]
    graph = onnx.load(path, load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"toy.onnx.data"}
    onnx.checker.check_model(str(path), full_check=True)
    rows = validate_component(module, path, SPEC, validation_shapes(SPEC), "fp32")
    assert all(r["ok"] for r in rows)


def test_fp16_export(tmp_path):
    module = Toy()
    path = tmp_path / "toy16.onnx"
    info = export_component(module, SPEC, path, dtype="fp16", opset=20)
    model = onnx.load(path)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types == {"x": onnx.TensorProto.FLOAT16, "y": onnx.TensorProto.FLOAT16, "mask": onnx.TensorProto.INT64,
                     "out": onnx.TensorProto.FLOAT16}
    assert info.precision == "fp16" and model.opset_import[0].version == 20
    assert next(module.parameters()).dtype == torch.float16  # cast in place, no second copy
    rows = validate_component(module, path, SPEC, validation_shapes(SPEC), "fp16")
    assert all(r["ok"] and r["max_rel"] <= TOLERANCE["fp16"] for r in rows)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_component(Toy(), SPEC, tmp_path / "a.onnx", opset=23)
    with pytest.raises(ValueError, match="dtype"):
        export_component(Toy(), SPEC, tmp_path / "a.onnx", dtype="int8")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_files(tmp_path):
    class Raises(Toy):
        def forward(self, x, y, mask):
            raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        export_component(Raises(), SPEC, tmp_path / "r.onnx")
    assert list(tmp_path.iterdir()) == []


def test_fp16_tolerance_follows_pytorchs_own_fp16_error():
    fp32 = [Case({}, {}, {"out": np.array([1.0, -4.0])}), Case({}, {}, {"out": np.array([2.0, 0.0])})]
    fp16 = [Case({}, {}, {"out": np.array([1.0, -4.02])}), Case({}, {}, {"out": np.array([2.06, 0.0])})]
    assert fp16_noise(fp32, fp16) == pytest.approx(0.03)  # 0.06 / 2 on the second shape (0.02 / 4 on the first)
    assert fp16_tolerance(0.03) == pytest.approx(0.06)
    assert fp16_tolerance(0.001) == TOLERANCE["fp16"]  # never tighter than 1e-2


def test_weights_are_freed_after_export(tmp_path):
    """Nothing the export leaves behind holds the module's weights (so an exporter can drop a large
    component before onnxruntime loads its graph)."""
    import gc
    import weakref

    module = Toy()
    export_component(module, SPEC, tmp_path / "toy.onnx")
    weight = weakref.ref(module.out.weight)
    del module
    gc.collect()
    assert weight() is None


def test_export_while_the_caller_holds_an_open_npz(tmp_path):
    """A library does not depend on its caller's open files: np.load of an .npz keeps an attribute bag
    whose __class__ lookup raises AttributeError; the exporter's scan for onnxscript's matchers met it."""
    np.savez(tmp_path / "held.npz", a=np.arange(3))
    with np.load(tmp_path / "held.npz") as held:
        bag = held.f  # alive in this process during the export, as a caller's would be
        info = export_component(Toy(), SPEC, tmp_path / "toy.onnx")
        assert (tmp_path / info.file).is_file() and bag.a.tolist() == [0, 1, 2]
