"""A float32 ONNX graph -> the same graph typed fp16 or bf16, for strongly typed TensorRT engines.

TensorRT 11 removed the FP16/BF16 builder flags (deprecated since 10.12): an engine runs in exactly the
types its graph declares. A bundle exported in fp32 (the CPU's graph, or a bundle `osx build` rebuilds
for another card) is cast here before its fp16/bf16 engine is built, on TensorRT 10.8+ and 11 alike:
float initializers, Constant / ConstantOfShape values and Cast-to-float nodes take the engine's type;
the graph's float inputs and outputs stay float32 with a Cast at each, so the component's declared I/O
(and every caller of it) is unchanged.

This is the plain cast the removed flags let TensorRT choose everywhere (and Open-Sora's own bf16
inference); NVIDIA's suggested route for mixed precision, ModelOpt AutoCast, additionally keeps
range-sensitive nodes in fp32. A graph exported in fp16/bf16 by torch keeps the model's own fp32 islands
and is used instead where the bundle has one (`onnx_files`).

Weights are streamed one initializer at a time (the external data file is memory-mapped), so casting
T5-XXL does not hold its 19 GB of fp32 weights in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from osx.bundle import EXTERNAL_DATA_BYTES
from osx.numeric import to_bfloat16_bits

TARGET_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FP16_MAX = 65504.0
# Inputs that ONNX requires to stay float32 whatever the data type (Resize's scales): their constants stay.
FLOAT32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}
# Ops without 16-bit float kernels in ONNX: they run in float32 between a Cast on each side.
FLOAT32_OPS = {"Range"}
EXTERNAL_THRESHOLD = EXTERNAL_DATA_BYTES  # typed weights above it go to a `.data` file beside the graph


def cast_array(a: np.ndarray, precision: str) -> tuple[bytes, int]:
    """float32 values -> (raw little-endian bytes, ONNX element type) at `precision` (fp16 saturates)."""
    if precision == "fp16":
        return np.clip(a, -FP16_MAX, FP16_MAX).astype("<f2").tobytes(), TensorProto.FLOAT16
    return to_bfloat16_bits(a).astype("<u2").tobytes(), TensorProto.BFLOAT16


def _typed_tensor(t: TensorProto, values: np.ndarray, precision: str) -> TensorProto:
    raw, elem = cast_array(values, precision)
    return TensorProto(name=t.name, data_type=elem, dims=list(t.dims), raw_data=raw)


class _ExternalReader:
    """Reads external initializers of one graph through a memory map per data file."""

    def __init__(self, base: Path):
        self.base, self.maps = base, {}

    def read(self, t: TensorProto) -> np.ndarray:
        info = {e.key: e.value for e in t.external_data}
        path = self.base / info["location"]
        if path not in self.maps:
            self.maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        offset = int(info.get("offset", 0))
        length = int(info.get("length", 4 * int(np.prod(t.dims, dtype=np.int64))))
        return self.maps[path][offset:offset + length].view("<f4").reshape(tuple(t.dims))


def _keep_float32(graph: onnx.GraphProto) -> set[str]:
    return {n.input[i] for n in graph.node for op, i in FLOAT32_ONLY_INPUTS if n.op_type == op and len(n.input) > i}


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _rename_uses(sub, old, new)  # subgraphs may read outer-scope names


def _cast_nodes(graph: onnx.GraphProto, precision: str, keep: set[str]) -> None:
    """Constants, ConstantOfShape values and Cast-to-float nodes take the target type (subgraphs too)."""
    to = TARGET_TYPES[precision]
    for n in graph.node:
        if n.op_type == "Cast":
            for a in n.attribute:
                if a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = to
        elif n.op_type in ("Constant", "ConstantOfShape") and not (n.op_type == "Constant" and n.output[0] in keep):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(_typed_tensor(a.t, numpy_helper.to_array(a.t), precision))
                elif a.name in ("value_float", "value_floats"):
                    values = np.asarray(a.f if a.name == "value_float" else list(a.floats), np.float32)
                    tensor = _typed_tensor(TensorProto(name="", dims=list(values.shape)), values, precision)
                    n.attribute.remove(a)
                    n.attribute.append(helper.make_attribute("value", tensor))
                    break
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _cast_nodes(sub, precision, keep)
                del sub.value_info[:]


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of the (still float32) graph, by ONNX type inference."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    return {vi.name for vi in (*g.input, *g.output, *g.value_info) if vi.type.tensor_type.elem_type == TensorProto.FLOAT}


def _float32_islands(graph: onnx.GraphProto, precision: str, floats: set[str]) -> None:
    """Each float-typed FLOAT32_OPS node reads its inputs cast to float32 and its outputs are cast back."""
    nodes = []
    for n in graph.node:
        if n.op_type not in FLOAT32_OPS or not any(o in floats for o in n.output):
            nodes.append(n)
            continue
        for k, name in enumerate(n.input):
            if name:
                wide = f"{name}__fp32_{n.name or n.output[0]}"
                nodes.append(helper.make_node("Cast", [name], [wide], name=f"osx_fp32_in_{wide}", to=TensorProto.FLOAT))
                n.input[k] = wide
        outs = list(n.output)
        n.output[:] = [f"{o}__fp32" for o in outs]
        nodes.append(n)
        nodes += [helper.make_node("Cast", [f"{o}__fp32"], [o], name=f"osx_fp32_out_{o}", to=TARGET_TYPES[precision])
                  for o in outs]
    del graph.node[:]
    graph.node.extend(nodes)


def cast_model(model: onnx.ModelProto, precision: str, base_dir: str | os.PathLike = ".") -> onnx.ModelProto:
    """`model` (float32, external data under `base_dir` read lazily) typed at `precision`, float32 I/O kept."""
    if precision not in TARGET_TYPES:
        raise ValueError(f"precision must be one of {sorted(TARGET_TYPES)}")
    to = TARGET_TYPES[precision]
    g = model.graph
    keep = _keep_float32(g)
    floats = _float_tensors(model)
    reader = _ExternalReader(Path(base_dir))
    initializers = []
    for t in g.initializer:
        if t.data_type != TensorProto.FLOAT or t.name in keep:
            initializers.append(t)
            continue
        values = reader.read(t) if t.data_location == TensorProto.EXTERNAL else numpy_helper.to_array(t)
        initializers.append(_typed_tensor(t, values, precision))
    del g.initializer[:]
    g.initializer.extend(initializers)
    _cast_nodes(g, precision, keep)
    _float32_islands(g, precision, floats)
    del g.value_info[:]  # stale float types: shape inference (and TensorRT) derive them again

    head, tail = [], []
    init_names = {t.name for t in g.initializer}
    for vi in g.input:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in init_names:
            typed = f"{vi.name}__{precision}"
            _rename_uses(g, vi.name, typed)
            head.append(helper.make_node("Cast", [vi.name], [typed], name=f"osx_cast_in_{vi.name}", to=to))
    for vi in g.output:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            typed = f"{vi.name}__{precision}"
            for n in g.node:
                n.output[:] = [typed if o == vi.name else o for o in n.output]
            _rename_uses(g, vi.name, typed)
            tail.append(helper.make_node("Cast", [typed], [vi.name], name=f"osx_cast_out_{vi.name}", to=TensorProto.FLOAT))
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    return model


def cast_onnx_file(src: str | os.PathLike, dst: str | os.PathLike, precision: str) -> list[Path]:
    """Write `src` (a float32 .onnx, with or without external data) typed at `precision` to `dst`
    (its weights in `dst`.data when over 1 GiB). Returns the files written; the graph file last."""
    src, dst = Path(src), Path(dst)
    model = cast_model(onnx.load(str(src), load_external_data=False), precision, src.parent)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    tmp = dst.with_name(dst.name + ".tmp")
    written = [dst]
    if weight_bytes > EXTERNAL_THRESHOLD:
        data = dst.parent / (dst.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing data file
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        written.append(data)
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, dst)
    return written
