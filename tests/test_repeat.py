"""Depth-independent tracing (osx.export.repeat): a model traced with 3 blocks whose last block is repeated to
full depth must be the graph a full-depth trace gives: the same onnxruntime outputs, the same initializers
(checkpoint weights by name; the exporter's own constants, numbered by trace order, by value), each
weight checked against its checkpoint tensor."""

import dataclasses
import hashlib
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from osx.errors import CheckpointError, OsxError
from osx.export.checkpoint import CheckpointReader, save_safetensors
from osx.export.exporter import repeat_for
from osx.export.init import seeded_init_
from osx.export.onnx_export import default_trace_sizes, export_streamed, torch_inputs
from osx.export.repeat import Repeat
from osx.export.stdit3 import STDiT3
from osx.export.stream import Weights, trainable_params_on_meta
from osx.families import component_specs, get_model_config

TINY = get_model_config("opensora-v1.2-tiny")
DEPTH = 4  # 3 traced blocks + 1 copy


def _cfg(depth):
    return dataclasses.replace(TINY, denoiser=dataclasses.replace(TINY.denoiser, depth=depth))


def _initializers(path):
    graph = onnx.load(str(path)).graph
    return {t.name: (t.data_type, tuple(t.dims), hashlib.sha256(onnx.numpy_helper.to_array(t).tobytes()).hexdigest())
            for t in graph.initializer}


@pytest.mark.slow  # two traces of the tiny denoiser (3 and 4 blocks)
def test_repeated_blocks_give_the_full_trace(tmp_path):
    cfg = _cfg(DEPTH)
    spec = component_specs(cfg)["denoiser"]
    ckpt = save_safetensors(seeded_init_(STDiT3(cfg.denoiser), 0).state_dict(), tmp_path / "w.safetensors")
    repeat = repeat_for(cfg, "denoiser")
    assert len(repeat.module.spatial_blocks) == 3 and repeat.blocks == ((("spatial_blocks", "temporal_blocks"), DEPTH),)

    def export(file, **kw):
        return export_streamed(Weights(lambda: STDiT3(cfg.denoiser), CheckpointReader(ckpt)), spec, tmp_path / file,
                               dtype="fp16", **kw)

    fast, full = export("fast.onnx", repeat=repeat), export("full.onnx")
    assert fast.nodes == full.nodes and fast.op_counts == full.op_counts
    assert fast.weights_check == full.weights_check  # every weight sha256-checked against its checkpoint tensor
    a, b = _initializers(tmp_path / "fast.onnx"), _initializers(tmp_path / "full.onnx")
    weights = [n for n in b if n.startswith("module.")]
    assert f"module.spatial_blocks.{DEPTH - 1}.attn.qkv.bias" in weights
    assert {n: a.get(n) for n in weights} == {n: b[n] for n in weights}
    assert Counter(a.values()) == Counter(b.values())  # folded transposes and constants: same values, same counts

    feeds = dict(zip((t.name for t in spec.inputs), (x.numpy() for x in torch_inputs(
        spec.with_precision("float16"), default_trace_sizes(spec), seed=1))))
    out_fast, out_full = (ort.InferenceSession(str(tmp_path / f)).run(None, feeds)[0] for f in ("fast.onnx", "full.onnx"))
    # the same graph function: equal to 1e-6 of the output's scale (measured: bit-identical)
    np.testing.assert_allclose(out_fast, out_full, rtol=0, atol=1e-6 * np.abs(out_full).max())
    # node names carry their own block's module path, as a full trace's do
    names = [n.name for n in onnx.load(str(tmp_path / "fast.onnx"), load_external_data=False).graph.node]
    assert any(n.startswith(f"/module/spatial_blocks/{DEPTH - 1}/attn/") for n in names)


class Block(torch.nn.Module):
    def __init__(self, width, odd=False):
        super().__init__()
        self.norm, self.linear = torch.nn.LayerNorm(width), torch.nn.Linear(width, width)
        self.odd = odd

    def forward(self, x):
        h = self.linear(self.norm(x))
        return x + (h.relu() if self.odd else h.reshape(x.shape[0], -1, 2, x.shape[-1] // 2).flatten(2))


class Toy(torch.nn.Module):
    def __init__(self, depth, odd_block=None):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(8, i == odd_block) for i in range(depth))
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def _toy_export(tmp_path, depth, traced, checkpoint_depth=None):
    from osx.components import FLOAT, ComponentSpec, DimRange, TensorSpec

    spec = ComponentSpec("toy", inputs=(TensorSpec("x", FLOAT, ("batch", "tokens", 8)),),
                         outputs=(TensorSpec("y", FLOAT, ("batch", "tokens", 4)),),
                         dims={"batch": DimRange(1, 2, 4), "tokens": DimRange(1, 3, 16)})
    ckpt = save_safetensors(seeded_init_(Toy(checkpoint_depth or depth), 0).state_dict(), tmp_path / "toy.safetensors")
    with trainable_params_on_meta():
        cut = Toy(**traced).to("meta")
    return export_streamed(Weights(lambda: Toy(depth), CheckpointReader(ckpt)), spec, tmp_path / "toy.onnx",
                           repeat=Repeat(cut, ((("blocks",), depth),))), spec, ckpt


def test_a_repeated_toy_model_computes_what_its_torch_module_does(tmp_path):
    info, spec, ckpt = _toy_export(tmp_path, 6, dict(depth=3))
    assert info.weights_check["from_checkpoint_sha256_ok"] == 6 * 4 + 2
    module, reader = Toy(6), CheckpointReader(ckpt)
    module.load_state_dict({k: reader.get(k) for k in reader.keys()})
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    got = ort.InferenceSession(str(tmp_path / "toy.onnx")).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=0, atol=1e-5)  # float32 reassociation


def test_blocks_that_trace_differently_are_refused(tmp_path):
    with pytest.raises(OsxError, match="different graphs"):
        _toy_export(tmp_path, 5, dict(depth=3, odd_block=2))


def test_a_checkpoint_without_the_repeated_blocks_names_the_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"blocks\.4\."):
        _toy_export(tmp_path, 5, dict(depth=3), checkpoint_depth=4)


def test_the_library_patches_step_aside_where_their_private_hooks_are_gone(monkeypatch):
    """The two speed patches of onnxscript's and onnxslim's internals: applied and undone where the hooks exist;
    where a later version renamed them, the export runs the libraries as they are (slower, the same graph)."""
    from onnxscript import rewriter
    from onnxslim.third_party.onnx_graphsurgeon.ir.graph import Graph

    from osx.export.onnx_export import _graph_inputs_found_by_identity, _without_slices_split

    rules, used = rewriter._DEFAULT_REWRITE_RULES, Graph._get_used_node_ids
    assert "SlicesSplit" in {getattr(r, "name", None) for r in rules}  # what the patch takes out
    with _without_slices_split(), _graph_inputs_found_by_identity():
        assert "SlicesSplit" not in {getattr(r, "name", None) for r in rewriter._DEFAULT_REWRITE_RULES}
        assert Graph._get_used_node_ids is not used
    assert rewriter._DEFAULT_REWRITE_RULES is rules and Graph._get_used_node_ids is used
    monkeypatch.delattr(rewriter, "_DEFAULT_REWRITE_RULES")
    monkeypatch.delattr(Graph, "_get_used_node_ids")
    with _without_slices_split(), _graph_inputs_found_by_identity():
        assert not hasattr(rewriter, "_DEFAULT_REWRITE_RULES") and not hasattr(Graph, "_get_used_node_ids")


def test_a_repeated_mmdit_computes_what_its_torch_module_does(tmp_path):
    """Open-Sora v2.0's MMDiT (double and single blocks, two repeated kinds) at 4 + 4 tiny blocks: traced with
    3 + 3 and repeated (one trace, no full one: that comparison is `bench.py repeat`), against PyTorch."""
    from osx.export.exporter import _adapter
    from osx.export.mmdit import MMDiT
    from osx.export.validate import compare_onnx, torch_reference, validation_shapes
    from osx.models_v2 import OPENSORA_V2_0_TINY

    cfg = dataclasses.replace(OPENSORA_V2_0_TINY, mmdit=dataclasses.replace(OPENSORA_V2_0_TINY.mmdit, depth=4, depth_single_blocks=4))
    spec = component_specs(cfg)["denoiser"]
    module = seeded_init_(MMDiT(cfg.mmdit), 0).eval()
    ckpt = save_safetensors(module.state_dict(), tmp_path / "w.safetensors")
    repeat = repeat_for(cfg, "denoiser")
    assert (len(repeat.module.double_blocks), len(repeat.module.single_blocks)) == (3, 3)
    assert repeat.blocks == ((("double_blocks",), 4), (("single_blocks",), 4))
    info = export_streamed(Weights(lambda: MMDiT(cfg.mmdit), CheckpointReader(ckpt)), spec, tmp_path / "mmdit.onnx",
                           repeat=repeat, adapter=_adapter(cfg))
    assert info.weights_check["from_checkpoint_sha256_ok"] == len(module.state_dict())  # the copies' weights included
    names = {t.name for t in onnx.load(str(tmp_path / "mmdit.onnx")).graph.initializer}
    assert {"module.double_blocks.3.img_attn.q_proj.bias", "module.single_blocks.3.linear2.bias"} <= names
    shapes = validation_shapes(spec)
    rows = compare_onnx(tmp_path / "mmdit.onnx", spec, torch_reference(module, spec, shapes, "fp32", _adapter(cfg)), "fp32")
    # float32 reassociation only: 1e-5 of the output's scale (the export's own tolerance is 1e-4)
    assert all(r["max_rel"] < 1e-5 for r in rows), rows
