"""Is a bf16 (or fp16) ONNX graph the fp32 graph with cast weights? A structural comparison.

onnxruntime's CPU provider runs no bfloat16 graphs, so a bf16 component is validated numerically as the
same export in fp32 (osx.export.exporter.validate_streamed); this check ties the two graphs together:

- nodes: with float-to-float Casts bypassed (the dtype policy's own Casts, e.g. T5's fp32 LayerNorm
  islands, exist only in the bf16 graph), both graphs have the same nodes in the same order, each with
  the same op, domain, attributes and inputs; an input is named by what produces it (graph input, the
  k-th output of the i-th node, an initializer), never by its name (the exporter numbers values by
  trace order);
- initializers: every one, paired by the node input that reads it, has the same shape, and its bytes
  are the fp32 one's cast to the typed graph's float type (round to nearest even, as torch casts) or, if
  not float, identical; tensor attributes (Constant values) likewise;
- the graph inputs and outputs have the same names and shapes.

Weights are read one initializer at a time from the external data files, so this fits beside a large export.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from osx.errors import ValidationError
from osx.numeric import to_bfloat16_bits

FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
SATURATE = {TensorProto.BFLOAT16: np.float32(3.3895314e38), TensorProto.FLOAT16: np.float32(65504.0)}  # each type's max


def compare_cast_graphs(reference: str | os.PathLike, typed: str | os.PathLike) -> dict:
    """Compare fp32 `reference` with `typed` (see the module docstring). Returns the counts recorded in the
    manifest; raises ValidationError naming the first difference."""
    ref, typ = Path(reference), Path(typed)
    b = _Graph(typ)
    low = next((t.data_type for t in b.inits.values() if t.data_type in (TensorProto.BFLOAT16, TensorProto.FLOAT16)),
               TensorProto.BFLOAT16)
    a, b = _Graph(ref, low), _Graph(typ, low)
    where = f"{typ.name} vs {ref.name}"
    for io in ("input", "output"):
        sa, sb = ([(v.name, _dims(v)) for v in getattr(g.proto, io)] for g in (a, b))
        if sa != sb:
            _fail(where, f"graph {io}s differ: {sb} != {sa}")
    outs = [(v.name, g.hash(v.name)) for g in (a, b) for v in g.proto.output]
    only_a, only_b = _unmatched(a.by_hash, b.by_hash)
    if only_a or only_b or outs[:len(a.proto.output)] != outs[len(a.proto.output):]:
        _fail(where, f"{len(only_a)} of the fp32 graph's {len(a.nodes)} nodes and {len(only_b)} of the typed graph's "
                     f"{len(b.nodes)} have no structural match; " + _first_difference(a, b, only_a, only_b))
    pairs = 0
    for h, nodes_a in a.by_hash.items():
        for i, j in zip(nodes_a, b.by_hash[h]):
            na, nb = a.nodes[i], b.nodes[j]
            for x, y in zip(na.input, nb.input):
                x, y = a.alias.get(x, x), b.alias.get(y, y)
                if x in a.inits and y in b.inits:
                    pairs += 1
                    ta, tb = a.inits[x], b.inits[y]
                    if list(ta.dims) != list(tb.dims) or not _is_cast(a.chunks(ta), b.chunks(tb), tb.data_type):
                        _fail(where, f"initializer {y} is not the fp32 graph's {x} cast to {_type(tb.data_type)}")
            for x, y in zip(na.attribute, nb.attribute):
                if x.type == onnx.AttributeProto.TENSOR:
                    if not _is_cast(_split(numpy_helper.to_array(x.t)), _split(numpy_helper.to_array(y.t)), y.t.data_type):
                        _fail(where, f"{nb.op_type} {nb.name!r} attribute {y.name} is not the fp32 graph's cast")
    return {"compared": where, "nodes": len(a.nodes), "float_casts_bypassed": {"fp32": a.casts, "typed": b.casts},
            "initializer_uses_cast_equal": pairs}


def _first_difference(a: "_Graph", b: "_Graph", only_a: list[int], only_b: list[int]) -> str:
    """The earliest unmatched node (graph order) and, where it reads one, an initializer whose cast values
    the other graph does not hold."""
    if not (only_a or only_b):
        return "the graph outputs are computed differently"
    side, other, i = (b, a, min(only_b)) if only_b else (a, b, min(only_a))
    node = side.nodes[i]
    held = {other.hash(t) for t in other.inits}
    stray = [x for x in node.input if side.alias.get(x, x) in side.inits and side.hash(x) not in held]
    where = f"{node.op_type} {node.name!r} in {side.path.name}"
    if stray:
        return f"{where} reads initializer {stray[0]}, which is no initializer of {other.path.name} cast"
    return f"first unmatched node: {where}"


def _unmatched(x: dict[str, list[int]], y: dict[str, list[int]]) -> tuple[list[int], list[int]]:
    """Nodes of each side whose structural hash the other side has fewer of."""
    return ([i for h, ns in x.items() for i in ns[len(y.get(h, ())):]],
            [j for h, ns in y.items() for j in ns[len(x.get(h, ())):]])


class _Graph:
    """A graph with float-to-float Cast nodes bypassed and every value hashed by how it is computed: a
    graph input by its name, an initializer by its shape and its values in the `low` float type, a node
    output by its op, attributes and input hashes (so node order and value names do not matter)."""

    def __init__(self, path: Path, low: int = TensorProto.BFLOAT16):
        self.path, self.low = path, low
        self.proto = onnx.load(str(path), load_external_data=False).graph
        self.inits = {t.name: t for t in self.proto.initializer}
        self.types = {v.name: v.type.tensor_type.elem_type for v in (*self.proto.input, *self.proto.value_info)}
        self.alias: dict[str, str] = {}
        self.nodes, self.casts, self.hashes = [], 0, {}
        self.by_hash: dict[str, list[int]] = {}
        for n in self.proto.node:
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            if n.op_type == "Cast" and n.domain in ("", "ai.onnx") and to in FLOATS and self._is_float(n.input[0]):
                self.alias[n.output[0]] = self.alias.get(n.input[0], n.input[0])
                self.casts += 1
                continue
            h = _digest((n.domain, n.op_type, [_attribute(a, low) for a in n.attribute], [self.hash(i) for i in n.input]))
            self.by_hash.setdefault(h, []).append(len(self.nodes))
            self.nodes.append(n)
            for k, o in enumerate(n.output):
                self.hashes[o] = _digest((h, k))

    def _is_float(self, name: str) -> bool:
        """Whether `name` holds floats (intermediate values of unknown type count as float: torch.export
        casts between float types only where the dtype policy asks; inputs and initializers are known)."""
        name = self.alias.get(name, name)
        if name in self.inits:
            return self.inits[name].data_type in FLOATS
        return self.types.get(name, TensorProto.FLOAT) in FLOATS

    def hash(self, name: str) -> str:
        name = self.alias.get(name, name)
        if name not in self.hashes:
            t = self.inits.get(name)
            self.hashes[name] = _digest(("input", name) if t is None else ("init", list(t.dims), _values(self.chunks(t), self.low)))
        return self.hashes[name]

    def chunks(self, t: TensorProto):
        """The initializer's values, flat, CHUNK elements at a time (external data read a chunk at a time,
        so the largest weight is never in memory whole)."""
        if t.data_location != TensorProto.EXTERNAL:
            yield from _split(numpy_helper.to_array(t))
            return
        info = {e.key: e.value for e in t.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        offset, count = int(info.get("offset", 0)), math.prod(t.dims)
        with open(self.path.parent / info["location"], "rb") as f:
            for start in range(0, count, CHUNK):
                n = min(CHUNK, count - start)
                yield np.frombuffer(os.pread(f.fileno(), n * dtype.itemsize, offset + start * dtype.itemsize), dtype)


CHUNK = 1 << 22  # elements at a time: T5-XXL's 32128 x 4096 table is 32 of them


def _split(a: np.ndarray):
    flat = a.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        yield flat[start:start + CHUNK]


def _is_cast(reference, typed, data_type: int) -> bool:
    """Whether the `typed` chunks' bytes are the `reference` chunks' cast to `data_type` (or equal, where
    neither is float); both are chunk iterators of one shape."""
    return all(r is not None and t is not None and _expected_bytes(r, data_type) == t.tobytes()
               for r, t in itertools.zip_longest(reference, typed))


def _values(chunks, low: int) -> str:
    """A digest of an initializer's values (`chunks`), float ones as cast to `low` (the same in both graphs
    when one is the other cast)."""
    h = hashlib.sha256()
    for a in chunks:
        floating = a.dtype.kind == "f" or a.dtype.name == "bfloat16"
        h.update(b"float" if floating else a.dtype.str.encode())
        if floating and a.dtype == helper.tensor_dtype_to_np_dtype(low):
            h.update(a.tobytes())
        else:
            h.update(_expected_bytes(a.astype(np.float32, copy=False) if floating else a, low if floating else -1))
    return h.hexdigest()[:32]


def _attribute(a: onnx.AttributeProto, low: int):
    if a.type == onnx.AttributeProto.TENSOR:
        return a.name, list(a.t.dims), _values(_split(numpy_helper.to_array(a.t)), low)
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return a.name, "subgraph", a.SerializeToString()  # compared as written (none in osx's exports)
    value = helper.get_attribute_value(a)
    return a.name, "float type" if a.name in ("to", "dtype") and value in FLOATS else repr(value)


def _digest(x) -> str:
    return hashlib.sha256(repr(x).encode() if not isinstance(x, bytes) else x).hexdigest()[:32]


def _expected_bytes(values: np.ndarray, data_type: int) -> bytes:
    """`values` (the fp32 graph's) as the typed graph stores them (-1: as they are): float32 cast to `data_type`, saturating
    (a mask fill of torch.finfo(float32).min is torch.finfo(bfloat16).min in the bf16 graph, not -inf)."""
    if values.dtype == np.float32 and data_type in SATURATE:
        values = np.clip(values, -SATURATE[data_type], SATURATE[data_type])
    if values.dtype == np.float32 and data_type == TensorProto.BFLOAT16:
        return to_bfloat16_bits(values).astype("<u2").tobytes()
    if values.dtype == np.float32 and data_type == TensorProto.FLOAT16:
        return values.astype("<f2").tobytes()
    if data_type != -1 and helper.tensor_dtype_to_np_dtype(data_type) != values.dtype:
        return b"not the same type"
    return np.ascontiguousarray(values).tobytes()


def _dims(v: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def _type(data_type: int) -> str:
    return TensorProto.DataType.Name(data_type).lower()


def _fail(where: str, msg: str):
    raise ValidationError(f"{where}: not the same graph with cast weights: {msg}",
                          hint="the bf16 export differs from the fp32 one it was validated as; report it with both files")
