"""A bf16 export is validated as the same export in fp32 (onnxruntime's CPU provider runs no bf16), then
shown to be that graph with cast weights (osx.export.structure). Tiny T5: the one bf16 component."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from osx.errors import ValidationError
from osx.export import exporter
from osx.export.checkpoint import CheckpointReader, save_safetensors
from osx.export.onnx_export import export_streamed
from osx.export.reference import build_reference
from osx.export.request import RANDOM_WEIGHTS, ExportRequest
from osx.export.structure import compare_cast_graphs
from osx.export.stream import Weights
from osx.export.t5 import T5TextEncoder
from osx.families import component_specs
from osx.models import get_model_config

TINY = get_model_config("opensora-v1.2-tiny")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """The tiny T5 exported (streamed, same checkpoint) in fp32 and in bf16."""
    d = tmp_path_factory.mktemp("t5")
    ckpt = save_safetensors(build_reference(TINY).text_encoder.state_dict(), d / "t5.safetensors")
    spec = component_specs(TINY)["text_encoder"]
    for dtype in ("fp32", "bf16"):
        export_streamed(Weights(lambda: T5TextEncoder(TINY.text_encoder), CheckpointReader(ckpt)), spec,
                        d / f"t5.{dtype}.onnx", dtype=dtype)
    return d / "t5.fp32.onnx", d / "t5.bf16.onnx"


def test_bf16_graph_is_the_fp32_graph_with_cast_weights(graphs):
    fp32, bf16 = graphs
    got = compare_cast_graphs(fp32, bf16)
    n_fp32 = len(onnx.load(str(fp32), load_external_data=False).graph.node)
    inits = onnx.load(str(bf16), load_external_data=False).graph.initializer
    assert got["float_casts_bypassed"]["typed"] > 0  # T5's fp32 islands: the casts differ, nothing else
    assert got["nodes"] == n_fp32 - got["float_casts_bypassed"]["fp32"]
    assert got["initializer_uses_cast_equal"] >= len(inits) > 0
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in inits)


def _edited(path, tmp_path, edit):
    model = onnx.load(str(path))
    edit(model.graph)
    out = tmp_path / "edited.onnx"
    onnx.save(model, str(out))
    return out


def _bump_weight(graph):  # one bf16 value one step (ulp) up
    t = next(t for t in graph.initializer if t.name == "module.encoder.block.0.layer.0.layer_norm.weight")
    bits = numpy_helper.to_array(t).view(np.uint16).copy() if t.data_type != onnx.TensorProto.BFLOAT16 else \
        np.frombuffer(t.raw_data, np.uint16).copy()
    bits[3] += 1
    t.raw_data = bits.tobytes()


def _softmax_axis(graph):
    node = next(n for n in graph.node if n.op_type == "Softmax")
    next(a for a in node.attribute if a.name == "axis").i = 1


def _mul_to_add(graph):
    next(n for n in graph.node if n.op_type == "Mul" and "layer_norm.weight" in n.input[0]).op_type = "Add"


@pytest.mark.parametrize("edit, message", [
    (_bump_weight, "reads initializer module.encoder.block.0.layer.0.layer_norm.weight, which is no initializer of "
                   "t5.fp32.onnx cast"),
    (_softmax_axis, "first unmatched node: Softmax"),
    (_mul_to_add, "first unmatched node: Add"),
])
def test_a_changed_bf16_graph_is_refused(graphs, tmp_path, edit, message):
    fp32, bf16 = graphs
    with pytest.raises(ValidationError, match="not the same graph with cast weights") as e:
        compare_cast_graphs(fp32, _edited(bf16, tmp_path, edit))
    assert message in str(e.value)


def test_graphs_of_other_weights_are_refused(graphs, tmp_path):
    """The same model with other weights is not "the same graph with cast weights"."""
    fp32, bf16 = graphs
    ckpt = save_safetensors({k: v + 1 for k, v in build_reference(TINY).text_encoder.state_dict().items()},
                            tmp_path / "other.safetensors")
    export_streamed(Weights(lambda: T5TextEncoder(TINY.text_encoder), CheckpointReader(ckpt)),
                    component_specs(TINY)["text_encoder"], tmp_path / "other.onnx", dtype="fp32")
    with pytest.raises(ValidationError, match="not the same graph with cast weights"):
        compare_cast_graphs(tmp_path / "other.onnx", bf16)


@pytest.mark.parametrize("cut", [False, True])
def test_bf16_export_records_the_comparison(tmp_path, monkeypatch, cut):
    """`osx export --dtype text_encoder=bf16`: validated in fp32 (at reduced depth when the weights are
    large, here forced), and the manifest says which bf16 graph was compared with it and what matched."""
    if cut:
        monkeypatch.setattr(exporter, "VALIDATION_BYTES", 100_000)  # the tiny T5's fp32 weights are 230 kB
    exporter.export_bundle(ExportRequest("opensora-v1.2-tiny", tmp_path / "b", RANDOM_WEIGHTS, dtype="text_encoder=bf16",
                                         only=("text_encoder",), progress=lambda m: None))
    entry = json.loads((tmp_path / "b" / "manifest.json").read_text())["components"]["text_encoder"]
    v = entry["validation"]
    assert entry["precision"] == "bf16" and v["dtype"] == "fp32" and all(r["ok"] for r in v["rows"])
    s = v["structure"]
    assert s["typed_graph"] == ("the same cut exported in bf16" if cut else "this file")
    assert s["float_casts_bypassed"]["typed"] > 0 and s["initializer_uses_cast_equal"] > 0
    assert (v["depth"] is not None) == cut and (not cut or v["depth"][0] < v["depth"][1])
    assert not list(tmp_path.glob(".b.scratch-*"))  # the validation graphs went with the scratch folder
