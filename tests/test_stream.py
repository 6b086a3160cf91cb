"""Streamed export (osx.export.stream): the module is traced on the meta device and every initializer is
written from the checkpoint. It must write exactly what the in-memory export of the same weights writes
(byte-identical initializers, identical onnxruntime outputs), name the key of any gap, and check what
it wrote against the checkpoint."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from osx.families import component_specs
from osx.errors import CheckpointError
from osx.export.checkpoint import CheckpointReader, save_safetensors, write_safetensors_streamed
from osx.export.onnx_export import export_component, export_streamed
from osx.export.reference import build_reference
from osx.export.stdit3 import STDiT3
from osx.export.stream import Weights
from osx.export.t5 import T5TextEncoder
from osx.export.vae import VideoAutoencoder
from osx.models import get_model_config

TINY = get_model_config("opensora-v1.2-tiny")
FACTORIES = {"denoiser": ("denoiser", lambda: STDiT3(TINY.denoiser)),
             "text_encoder": ("text_encoder", lambda: T5TextEncoder(TINY.text_encoder)),
             "vae_decoder": ("vae", lambda: VideoAutoencoder(TINY.vae))}


@pytest.fixture(scope="module")
def reference():
    return build_reference(TINY)


def _both(reference, tmp_path, component, dtype, in_memory=None):
    """The streamed export of `reference`'s `component`, and its in-memory export (`in_memory`: one made already)."""
    attr, factory = FACTORIES[component]
    module = getattr(reference, attr)
    ckpt = save_safetensors(module.state_dict(), tmp_path / "weights.safetensors")
    spec = component_specs(TINY)[component]
    streamed = export_streamed(Weights(factory, CheckpointReader(ckpt)), spec, tmp_path / "streamed.onnx", dtype=dtype)
    if in_memory is None:
        in_memory = tmp_path / "in_memory.onnx"
        export_component(module, spec, in_memory, dtype=dtype)  # casts the module: after the checkpoint is written
    return streamed, tmp_path / "streamed.onnx", in_memory, spec.with_precision({"fp32": "float32", "fp16": "float16"}[dtype])


@pytest.mark.parametrize("component,dtype", [("denoiser", "fp16"), ("text_encoder", "fp32"),
                                             pytest.param("vae_decoder", "fp32", marks=pytest.mark.slow)])
def test_streamed_export_writes_what_the_in_memory_export_writes(reference, tmp_path, request, component, dtype):
    # the fp16 denoiser's in-memory export is the session's (the same weights: build_reference's), which test_lint lints
    made = request.getfixturevalue("tiny_fp16_graphs")[component] if dtype == "fp16" else None
    info, streamed, in_memory, spec = _both(reference, tmp_path, component, dtype, made)
    a, b = onnx.load(str(streamed)).graph, onnx.load(str(in_memory)).graph
    assert [n.op_type for n in a.node] == [n.op_type for n in b.node]
    inits_a = {t.name: t for t in a.initializer}
    inits_b = {t.name: t for t in b.initializer}
    # The exporter numbers its own small constants (val_N) by trace order, which differs on the meta
    # device; so initializers are paired by where the graph uses them, and weights also by name.
    pairs = [(x, y) for na, nb in zip(a.node, b.node) for x, y in zip(na.input, nb.input) if x in inits_a or y in inits_b]
    assert pairs and all(x in inits_a and y in inits_b for x, y in pairs)
    for x, y in pairs:
        renamed = onnx.TensorProto()
        renamed.CopyFrom(inits_b[y])
        renamed.name = x
        assert inits_a[x].SerializeToString() == renamed.SerializeToString(), (x, y)
    weights = {n for n in inits_a if n.startswith("module.")}
    assert weights and weights == {n for n in inits_b if n.startswith("module.")}
    folded = {n for n, t in inits_a.items() if not n.startswith("module.") and len(t.dims) >= 2}
    assert len(folded) >= 2  # weight transposes, streamed as lazy transposes of their checkpoint tensors
    assert len(pairs) >= len(inits_a) - 2
    # Every weight from the checkpoint was checked (sha256); the rest are computed or folded constants.
    check = info.weights_check
    assert check["from_checkpoint_sha256_ok"] >= len(weights) and check["initializers"] == len(inits_a)
    # Identical outputs from onnxruntime at a shape inside the ranges.
    inputs = spec.sample_inputs(seed=3)
    out = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, inputs) for p in (streamed, in_memory)]
    for x, y in zip(*out):
        np.testing.assert_array_equal(x, y)


def test_a_missing_weight_is_named(tmp_path):
    state = STDiT3(TINY.denoiser).state_dict()
    del state["spatial_blocks.1.attn.proj.weight"]
    ckpt = save_safetensors(state, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"spatial_blocks\.1\.attn\.proj\.weight"):
        Weights(lambda: STDiT3(TINY.denoiser), CheckpointReader(ckpt))


def test_meta_build_keeps_computed_constants_and_ties():
    w_t5 = T5TextEncoder(TINY.text_encoder)
    ckpt_keys = dict.fromkeys(w_t5.state_dict())
    ckpt_keys.pop("encoder.embed_tokens.weight")  # stored once, as transformers saves it

    class Reader:  # only names and shapes: nothing is read while building
        source = "test"

        def keys(self):
            return list(ckpt_keys)

        def __contains__(self, k):
            return k in ckpt_keys

        def shape(self, k):
            return tuple(w_t5.state_dict()[k].shape)

    w = Weights(lambda: T5TextEncoder(TINY.text_encoder), Reader())
    assert all(p.device.type == "meta" for p in w.module.parameters())
    assert w.source("encoder.embed_tokens.weight") == "shared.weight"  # the tied name
    d = Weights(lambda: STDiT3(TINY.denoiser), _FakeReader(STDiT3(TINY.denoiser)))
    assert torch.equal(d.constants["rope.freqs"], STDiT3(TINY.denoiser).rope.freqs)


class _FakeReader:
    source = "test"

    def __init__(self, module):
        self.state = module.state_dict()

    def keys(self):
        return list(self.state)

    def __contains__(self, k):
        return k in self.state

    def shape(self, k):
        return tuple(self.state[k].shape)


def test_streamed_safetensors_and_reader(tmp_path):
    """The streamed writer makes a file safetensors reads; the reader sees names, shapes and dtypes from
    the header and returns each tensor, from single files, sharded indexes and mmapped pickles."""
    tensors = {"a.weight": ((3, 4), torch.float32), "b.bias": ((5,), torch.bfloat16), "c": ((2, 2), torch.float16)}
    made = {k: torch.randn(s).to(d) for k, (s, d) in tensors.items()}
    path = write_safetensors_streamed(tmp_path / "m.safetensors", tensors, lambda k: made[k])
    reader = CheckpointReader(path)
    assert reader.keys() == list(tensors) and reader.shape("a.weight") == (3, 4) and reader.dtype("b.bias") == torch.bfloat16
    for k, t in made.items():
        assert torch.equal(reader.get(k), t)
    index = save_safetensors({k: v.float() for k, v in made.items()}, tmp_path / "s" / "model.safetensors", max_shard_bytes=40)
    assert torch.equal(CheckpointReader(index).get("c"), made["c"].float())
    torch.save({"module.x": torch.arange(6.0)}, tmp_path / "p.bin")
    assert torch.equal(CheckpointReader(tmp_path / "p.bin").get("x"), torch.arange(6.0))
    with pytest.raises(CheckpointError, match="has no tensor 'y'"):
        CheckpointReader(tmp_path / "p.bin").get("y")


def test_random_checkpoint_holds_the_reference_weights(tmp_path):
    """--random-weights writes each part as a checkpoint, one tensor at a time; its tensors are exactly
    build_reference's (tied tensors once), so the streamed bundle is the reference model's export."""
    from osx.export.reference import write_random_checkpoint

    reference = build_reference(TINY)  # its own: the module fixture is cast in place by the fp16 exports above

    for part, attr in (("t5", "text_encoder"), ("denoiser", "denoiser"), ("vae", "vae")):
        reader = CheckpointReader(write_random_checkpoint(TINY, part, tmp_path / f"{part}.safetensors", torch.float32))
        state = getattr(reference, attr).state_dict()
        assert set(reader.keys()) == set(state) - ({"encoder.embed_tokens.weight"} if part == "t5" else set())
        assert all(torch.equal(reader.get(k), state[k]) for k in reader.keys())
    half = CheckpointReader(write_random_checkpoint(TINY, "denoiser", tmp_path / "h.safetensors", torch.float16))
    name = next(k for k in half.keys() if k.endswith(".weight") and len(half.shape(k)) == 2)
    assert torch.equal(half.get(name), reference.denoiser.state_dict()[name].half())


@pytest.mark.slow
def test_large_components_validate_at_reduced_depth(tmp_path, monkeypatch):
    """Above VALIDATION_BYTES the component is validated with its first blocks (same checkpoint, same
    streamed path), the full graph structurally; --component exports just that component."""
    from osx.export import exporter
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    monkeypatch.setattr(exporter, "VALIDATION_BYTES", 1000)
    m = exporter.export_bundle(ExportRequest("opensora-v1.2-tiny", tmp_path / "b", RANDOM_WEIGHTS, only=("denoiser",),
                                             progress=lambda m: None))
    c = m.components["denoiser"]
    assert list(m.components) == ["denoiser"]
    assert c.report["validation"]["depth"] == [1, 2] and "first 1 of 2 blocks" in c.report["validation"]["graph"]
    assert all(r["ok"] for r in c.report["validation"]["rows"])
    assert c.report["weights_check"]["from_checkpoint_sha256_ok"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # scratch removed
