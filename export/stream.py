"""Streamed export: trace a module that has no weights, then write each weight straight from the checkpoint.

    factory() on the meta device -> torch.export -> ONNX graph whose initializers are lazy
    -> each initializer read from the memory-mapped checkpoint, cast, written, freed (one at a time)

Memory does not grow with the model: the module's trainable parameters never exist (they are created
on the meta device); its computed constants (buffers, frozen parameters such as RoPE frequencies) are
small and kept. Every ONNX initializer gets an explicit source, `module.<name>` -> checkpoint key (or
the tied name holding the same tensor, or the module's own computed constant); an initializer with no
source is an error naming it. Folded weight transposes become lazy transposes of their source, named
and placed exactly as onnxscript's constant folding names and places them, and everything else the
optimizer folds is computed from the same values, so the streamed and the in-memory exports of a model
write byte-identical initializers (tests/test_stream.py).

Nothing here knows a model family: a component is a factory (building its torch module), a reader
(`osx.export.checkpoint.CheckpointReader`) and optionally `key_of`, mapping module names to checkpoint
keys where they differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch

from osx.components import ComponentSpec
from osx.errors import CheckpointError
from osx.export.checkpoint import CheckpointReader, check_fit, tied_names

PREFIX = "module."  # SpecModule wraps the component's module as `.module`
FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"  # onnxscript's record of what a folded constant came from


@contextlib.contextmanager
def trainable_params_on_meta():
    """Create every trainable parameter on the meta device (no memory); buffers and frozen parameters
    (constants the module computes, e.g. RoPE frequencies) are made for real."""
    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.requires_grad and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=True)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class Weights:
    """Where each tensor of a module comes from: a checkpoint key, or the module's computed constant.

    `factory()` is built with its parameters on the meta device; `check_fit` compares the checkpoint's
    names and shapes (read from headers) with the module before anything is traced (`unused_ok`: the
    module may use a subset, e.g. the first blocks of a deep model for validation; `unused_prefixes`: keys
    the released file holds beyond the module, e.g. CLIP's vision tower, osx.families.WeightSource)."""

    def __init__(self, factory: Callable[[], torch.nn.Module], reader: CheckpointReader,
                 key_of: Callable[[str], str] | None = None, recomputable: tuple[str, ...] = ("rope.freqs",),
                 unused_ok: bool = False, unused_prefixes: tuple[str, ...] = ()):
        with trainable_params_on_meta():
            module = factory()
        self.reader, self.key_of = reader, key_of or (lambda name: name)
        self.aliases = tied_names(module)
        # computed constants: real buffers and frozen parameters, non-persistent buffers too (CLIP's position ids)
        tensors = {**dict(module.named_buffers()), **module.state_dict()}
        self.constants = {k: v.detach().clone() for k, v in tensors.items() if v.device.type != "meta"}
        keys = {self.key_of(k): k for k in module.state_dict()}
        shapes = {keys.get(k, k): reader.shape(k) for k in reader.keys() if not k.startswith(unused_prefixes) or k in keys}
        check_fit(module, shapes, reader.source, recomputable, unused_ok)
        self.module = module.to("meta").eval().requires_grad_(False)

    def source(self, name: str) -> str | None:
        """The checkpoint key of module tensor `name` (its own or a tied name's), None for a computed
        constant; CheckpointError naming `name` if it has neither."""
        for n in (name, *self.aliases.get(name, ())):
            if self.key_of(n) in self.reader:
                return self.key_of(n)
        if name in self.constants:
            return None
        raise CheckpointError(f"no weights for {name!r}: checkpoint {self.reader.source} has no key "
                              f"{self.key_of(name)!r} and the module does not compute it",
                              hint="check that the checkpoint belongs to this model and model config (--model)")

    def tensor(self, name: str) -> torch.Tensor:
        key = self.source(name)
        return self.constants[name] if key is None else self.reader.get(key)

    def materialize(self, dtype: torch.dtype) -> torch.nn.Module:
        """The module with real weights in `dtype` (for validation against PyTorch): each tensor read from
        the checkpoint in turn and assigned, so the peak is the module plus one tensor."""
        module = self.module
        state = {}
        for name, meta in module.state_dict(keep_vars=True).items():
            t = self.tensor(name)
            state[name] = t.to(dtype) if t.is_floating_point() and meta.is_floating_point() else t
        module.load_state_dict(state, assign=True)
        for name, buf in list(module.named_buffers()):  # non-persistent buffers are in no state dict
            if buf.is_meta and name in self.constants:
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner)._buffers[leaf] = self.constants[name]
        self.module = None  # the meta module now holds real weights; it is the caller's
        return module.eval().requires_grad_(False)


def stream_initializers(model: ir.Model, weights: Weights) -> dict[str, dict]:
    """Replace the meta-tensor initializers of the exporter's graph (before optimisation) by lazy
    tensors reading `weights`, and fold each single-use transpose of one into a lazy transposed tensor
    as onnxscript's constant folding would. Returns {initializer name: {"key", "transpose"?}} for the
    initializers now read from the checkpoint (computed constants are materialised: they are small)."""
    graph = model.graph
    sources: dict[str, dict] = {}
    for name, value in list(graph.initializers.items()):
        raw = getattr(value.const_value, "raw", None)
        if not isinstance(raw, torch.Tensor) or raw.device.type != "meta":
            continue
        module_name = name.removeprefix(PREFIX)
        key = weights.source(module_name)
        load = _loader(weights, module_name, raw.dtype)
        if key is None:  # a computed constant: small, kept in memory as the in-memory export keeps it
            value.const_value = _ir_tensor(load(), name)
            continue
        value.const_value = ir.LazyTensor(lambda f=load, n=name: _ir_tensor(f(), n), dtype=value.const_value.dtype,
                                          shape=value.const_value.shape, name=name)
        sources[name] = {"key": key}
    for node in list(graph):
        base = node.inputs[0] if node.inputs else None
        if (node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or base is None
                or base.name not in sources or len(base.uses()) != 1 or base.is_graph_output()):
            continue
        out = node.outputs[0]
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else tuple(reversed(range(len(base.shape))))
        load = _loader(weights, base.name.removeprefix(PREFIX), _TORCH_DTYPE[base.const_value.dtype])
        tensor = ir.LazyTensor(lambda f=load, p=perm, n=out.name: _ir_tensor(f().permute(p), n),
                               dtype=base.const_value.dtype, shape=ir.Shape([base.shape[i] for i in perm]), name=out.name)
        folded = ir.Value(name=out.name, type=ir.TensorType(base.const_value.dtype), shape=tensor.shape, const_value=tensor)
        folded.meta[FOLDED_FROM] = {base.name}
        folded.metadata_props[FOLDED_FROM] = repr([base.name])
        graph.register_initializer(folded)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [], [out], [folded])
        graph.initializers.pop(base.name)
        sources[out.name] = {"key": sources.pop(base.name)["key"], "transpose": list(perm)}
    return sources


def _loader(weights: Weights, module_name: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: weights.tensor(module_name).to(dtype)


_TORCH_DTYPE = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
                ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
                ir.DataType.BOOL: torch.bool, ir.DataType.UINT8: torch.uint8, ir.DataType.INT8: torch.int8}


def _ir_tensor(t: torch.Tensor, name: str) -> ir.Tensor:
    """A torch tensor as an ir.Tensor (bfloat16 through ml_dtypes, which numpy lacks)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy(), name=name)


# --- the structural check of a written graph -------------------------------------------------------------


def check_initializers(path: str | os.PathLike, sources: dict[str, dict], weights: Weights) -> dict:
    """Every initializer of the ONNX file at `path` that `sources` maps to a checkpoint key must have the
    dtype, shape and bytes (sha256) of that checkpoint tensor, cast (and transposed) as exported.
    Reads one tensor at a time from each side. Returns counts; raises CheckpointError on a mismatch."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    checked = computed = 0
    for init in model.graph.initializer:
        src = sources.get(init.name)
        if src is None:
            computed += 1
            continue
        expected = weights.reader.get(src["key"]).to(_TORCH_DTYPE[ir.DataType(init.data_type)])
        if "transpose" in src:
            expected = expected.permute(src["transpose"])
        want = hashlib.sha256(_ir_tensor(expected, init.name).tobytes()).hexdigest()
        del expected
        got = hashlib.sha256(stored_bytes(init, path.parent)).hexdigest()
        if tuple(init.dims) != tuple(_shape_of(src, weights)) or got != want:
            raise CheckpointError(f"{path.name}: initializer {init.name} does not match checkpoint tensor {src['key']} "
                                  f"(shape {list(init.dims)}, sha256 {got[:12]} != {want[:12]})",
                                  hint="the export is damaged; export again")
        checked += 1
    return {"initializers": len(model.graph.initializer), "from_checkpoint_sha256_ok": checked, "computed_or_folded": computed}


def _shape_of(src: dict, weights: Weights) -> tuple[int, ...]:
    shape = weights.reader.shape(src["key"])
    return tuple(shape[i] for i in src["transpose"]) if "transpose" in src else tuple(shape)


def stored_bytes(init: onnx.TensorProto, folder: Path) -> bytes:
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(init).tobytes() if not init.raw_data else init.raw_data
    info = {e.key: e.value for e in init.external_data}
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]))
