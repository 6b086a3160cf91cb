"""TensorRT compatibility lint for ONNX graphs: no GPU, no TensorRT, seconds.

Checks every node against the operators, data types and restrictions of TensorRT's ONNX parser (the
table in `tensorrt_onnx_ops.json`, taken from onnx-tensorrt's published support matrix, with the
TensorRT version it describes), and the placement rules of explicit quantization (Q/DQ): symmetric
signed quantization, constant scales, per-channel only on weights, every Q followed by a DQ, every DQ
fed by a Q or a constant. Problems are reported by node name; `severity` "error" means the parse or
build fails, "warning" means it builds but runs in a slower or different precision than intended.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TABLE_FILE = Path(__file__).with_name("tensorrt_onnx_ops.json")
DEFAULT_DOMAINS = ("", "ai.onnx")
ONNX_TYPES = {  # onnx.TensorProto element type -> TensorRT's name in the support table
    onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "DOUBLE", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.FLOAT8E4M3FN: "FP8", onnx.TensorProto.INT4: "INT4",
}
if hasattr(onnx.TensorProto, "FLOAT4E2M1"):
    ONNX_TYPES[onnx.TensorProto.FLOAT4E2M1] = "FP4"
RESIZE_RULES = {
    "coordinate_transformation_mode": ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"),
    "mode": ("nearest", "linear"),
    "nearest_mode": ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"),
    "keep_aspect_ratio_policy": ("stretch",),
}
GEMMS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
# Quantize / dequantize ops of the "trt" domain (ModelOpt writes them for FP8 / INT4) that TensorRT's ONNX
# parser imports as built-ins (onnx-tensorrt onnxOpImporters.cpp: TRT_FP8QuantizeLinear, ...): the standard
# op each stands for, so the same explicit-quantization rules apply.
TRT_DOMAIN = "trt"
TRT_QDQ = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear",
           "TRT_INT4QuantizeLinear": "QuantizeLinear", "TRT_INT4DequantizeLinear": "DequantizeLinear"}


def qdq_kind(n: onnx.NodeProto) -> str | None:
    """"QuantizeLinear" / "DequantizeLinear" for a standard or trt-domain Q/DQ node, else None."""
    if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in DEFAULT_DOMAINS:
        return n.op_type
    return TRT_QDQ.get(n.op_type) if n.domain == TRT_DOMAIN else None


@dataclass(frozen=True)
class LintIssue:
    node: str
    op: str
    problem: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.node} ({self.op}): {self.problem}"

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def support_table() -> dict:
    return json.loads(TABLE_FILE.read_text())


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class _Graph:
    """Name lookups over one model: element types, constants, producers and consumers."""

    def __init__(self, model: onnx.ModelProto | None, base_dir: str = ""):
        self.base_dir = base_dir
        self.types: dict[str, int] = {}
        self.constants: dict[str, onnx.TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.graph_outputs: set[str] = set()
        if model is None:  # a function body: no types known
            return
        self.graph_outputs = {o.name for o in model.graph.output}
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # inference is a help for type checks, not a requirement
            inferred = model
        self._scan(inferred.graph)

    def _scan(self, g: onnx.GraphProto) -> None:
        for vi in (*g.input, *g.output, *g.value_info):
            if vi.type.HasField("tensor_type"):
                self.types[vi.name] = vi.type.tensor_type.elem_type
        for t in g.initializer:
            self.types[t.name] = t.data_type
            self.constants[t.name] = t
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            if n.op_type == "Constant" and _attr(n, "value") is not None:
                self.constants[n.output[0]] = _attr(n, "value")
                self.types[n.output[0]] = _attr(n, "value").data_type
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    self._scan(sub)

    def type_name(self, tensor: str) -> str | None:
        t = self.types.get(tensor)
        return None if t is None or t == onnx.TensorProto.UNDEFINED else ONNX_TYPES.get(t, onnx.TensorProto.DataType.Name(t))

    def value(self, tensor: str) -> np.ndarray | None:
        t = self.constants.get(tensor)
        if t is None:
            return None
        try:
            return numpy_helper.to_array(t, self.base_dir)
        except Exception:  # external data not readable here
            return None


def _node_name(n: onnx.NodeProto, index: int) -> str:
    return n.name or f"<{n.op_type} #{index}>"


def _check_op(n: onnx.NodeProto, g: _Graph, table: dict, issue) -> None:
    supported = table["ops"].get(n.op_type, "missing")
    if supported == "missing":
        issue(f"{n.op_type} is not in TensorRT {table['tensorrt_version']}'s ONNX operator list")
        return
    if supported is None:
        issue(f"{n.op_type} is not supported by TensorRT's ONNX parser")
        return
    data = next((i for i in n.input if i), None) or (n.output[0] if n.output else None)
    kind = g.type_name(data) if data else None
    if kind == "DOUBLE" and "FP32" in supported:
        issue(f"input {data!r} is DOUBLE; TensorRT casts it to FP32 (clamped)", "warning")
    elif kind is not None and kind not in supported:
        issue(f"input {data!r} has type {kind}; TensorRT's {n.op_type} takes {', '.join(supported)}")
    _check_restrictions(n, g, issue)


def _check_restrictions(n: onnx.NodeProto, g: _Graph, issue) -> None:
    op = n.op_type
    if op.startswith("Reduce") and len(n.input) > 1 and n.input[1] and n.input[1] not in g.constants:
        issue("axes must be an initializer (a constant)")
    elif op == "Resize":
        for attr, allowed in RESIZE_RULES.items():
            v = _attr(n, attr)
            v = v.decode() if isinstance(v, bytes) else v
            if v is not None and v not in allowed:
                issue(f"{attr}={v!r} is not supported (TensorRT: {', '.join(allowed)})")
        if _attr(n, "antialias", 0):
            issue("antialias is not supported")
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        kernel = _attr(n, "kernel_shape", [])
        if op != "LpPool" and len(kernel) not in (2, 3):
            issue(f"{len(kernel)}D pooling: TensorRT pools in 2D or 3D only")
        if any(d != 1 for d in _attr(n, "dilations", []) or []):
            issue("dilations must be empty or all ones")
        if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
            issue("the Indices output is not supported")
    elif op == "LayerNormalization" and any(o for o in n.output[1:]):
        issue("only the first output (Y) is supported")
    elif op == "Dropout" and len(n.input) > 2 and n.input[2]:
        v = g.value(n.input[2])
        if v is None or bool(v):
            issue("training_mode must be an initializer that is False")
    elif op == "ScatterND" and (_attr(n, "reduction", b"none") or b"none") not in (b"none", "none"):
        issue("reduction other than none is not supported")
    elif op == "TopK":
        if _attr(n, "sorted", 1) == 0:
            issue("sorted=0 is not supported")
        k = g.value(n.input[1]) if len(n.input) > 1 else None
        if k is not None and int(np.max(k)) >= 3840:
            issue(f"K={int(np.max(k))} must be less than 3840")
    elif op == "LSTM" and (_attr(n, "input_forget", 0) or _attr(n, "layout", 0)):
        issue("input_forget and layout must be 0")
    elif op == "Constant" and any(a.name in ("sparse_value", "value_string", "value_strings") for a in n.attribute):
        issue("sparse and string constants are not supported")
    elif op in ("CumSum", "OneHot") and len(n.input) > 1 and n.input[1] and n.input[1] not in g.constants:
        issue(f"{'axis' if op == 'CumSum' else 'depth'} must be a build-time constant")
    elif op == "Attention":
        if len(n.input) > 4 and any(n.input[4:]):
            issue("past_key / past_value / nonpad_kv_seqlen inputs are not supported")
        if len(n.output) > 1 and any(n.output[1:]):
            issue("present_key / present_value / qk_matmul_output outputs are not supported")


def _check_qdq(n: onnx.NodeProto, g: _Graph, issue) -> None:
    """TensorRT's explicit-quantization rules for one QuantizeLinear / DequantizeLinear node."""
    is_q = qdq_kind(n) == "QuantizeLinear"
    scale = n.input[1] if len(n.input) > 1 else ""
    if scale not in g.constants:
        issue(f"scale {scale!r} must be a constant (initializer or Constant)")
    scale_value = g.value(scale)
    if scale_value is not None and np.any(scale_value <= 0):
        issue("scales must be positive")
    if len(n.input) > 2 and n.input[2]:
        zp = n.input[2]
        if g.type_name(zp) == "UINT8":
            issue("UINT8 (asymmetric) quantization is not supported: use INT8 with zero point 0")
        zp_value = g.value(zp)
        if zp not in g.constants:
            issue(f"zero point {zp!r} must be a constant")
        elif zp_value is not None and np.any(zp_value.astype(np.float32) != 0):
            issue("zero point must be zero (TensorRT quantizes symmetrically)")
    per_channel = scale_value is not None and scale_value.size > 1
    data = n.input[0]
    if is_q:
        if per_channel and data not in g.constants:
            issue("per-channel scales on an activation: TensorRT quantizes activations per tensor, weights per channel")
        for c in g.consumers.get(n.output[0], []):
            if qdq_kind(c) != "DequantizeLinear":
                issue(f"output feeds {c.op_type} {c.name!r}: each QuantizeLinear must be followed by DequantizeLinear")
        if n.output[0] in g.graph_outputs:
            issue("a quantized tensor is a graph output: end the graph in floating point (add the DequantizeLinear)")
    else:
        src = g.producer.get(data)
        from_q = src is not None and qdq_kind(src) == "QuantizeLinear"
        if data not in g.constants and not from_q:
            where = "a graph input" if src is None else f"{src.op_type} {src.name!r}"
            issue(f"input comes from {where}: DequantizeLinear must follow a QuantizeLinear or read quantized constant weights")
        if from_q:
            q_scale = g.value(src.input[1])
            if q_scale is not None and scale_value is not None and (
                    q_scale.shape != scale_value.shape or not np.allclose(q_scale, scale_value)):
                issue(f"scale differs from its QuantizeLinear {src.name!r}: the pair requantizes instead of fusing", "warning")
        weight = data in g.constants or (from_q and src.input[0] in g.constants)
        if per_channel and not weight:
            issue("per-channel scales on an activation: TensorRT dequantizes activations per tensor")


def _check_gemm_inputs(n: onnx.NodeProto, g: _Graph, issue) -> None:
    """A GEMM with only one quantized input runs in floating point: the quantization is wasted."""
    fed = [i for i in n.input[:2] if i]
    dq = [i for i in fed if (p := g.producer.get(i)) is not None and qdq_kind(p) == "DequantizeLinear"]
    if dq and len(dq) < len(fed):
        plain = next(i for i in fed if i not in dq)
        issue(f"input {plain!r} is not quantized while {dq[0]!r} is: TensorRT runs this {n.op_type} in floating point",
              "warning")


def lint_onnx(path_or_model: str | Path | onnx.ModelProto, trt_version: str | None = None) -> list[LintIssue]:
    """Problems TensorRT's ONNX parser / builder would have with this graph (empty list: none found)."""
    table = support_table()
    if isinstance(path_or_model, onnx.ModelProto):
        model, base_dir = path_or_model, ""
    else:
        path = Path(path_or_model)
        model, base_dir = onnx.load(str(path), load_external_data=False), str(path.parent)
    issues: list[LintIssue] = []
    if trt_version is not None and trt_version.split(".")[:2] != table["tensorrt_version"].split(".")[:2]:
        issues.append(LintIssue("<model>", "", f"the operator table is from TensorRT {table['tensorrt_version']}; "
                                f"TensorRT {trt_version} may support a different set", "warning"))
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    lo, hi = table["opset"]["min"], table["opset"]["max"]
    if opset is not None and not lo <= opset <= hi:
        issues.append(LintIssue("<model>", "", f"opset {opset} is outside TensorRT {table['tensorrt_version']}'s range {lo}..{hi}"))
    g = _Graph(model, base_dir)
    for vi in (*model.graph.input, *model.graph.output):
        kind = g.type_name(vi.name)
        if kind is not None and kind not in table["types"]:
            issues.append(LintIssue(vi.name, "<io>", f"graph input/output type {kind} is not supported by TensorRT"))
    functions = {(f.domain, f.name): f for f in model.functions}
    untyped = _Graph(None)
    counter = iter(range(1 << 62))

    def walk(nodes, typed: bool) -> None:
        for n in nodes:
            name = _node_name(n, next(counter))

            def issue(problem: str, severity: str = "error", _n=n, _name=name) -> None:
                issues.append(LintIssue(_name, _n.op_type, problem, severity))

            if (n.domain, n.op_type) in functions:  # a model-local function: TensorRT inlines its body
                walk(functions[(n.domain, n.op_type)].node, typed=False)
                continue
            kind = qdq_kind(n)
            if n.domain not in DEFAULT_DOMAINS and kind is None:
                issue(f"custom-domain op {n.domain}::{n.op_type}: TensorRT needs a plugin registered under that name")
                continue
            if n.domain in DEFAULT_DOMAINS:  # trt-domain Q/DQ: built into the parser, not in the op table
                _check_op(n, g if typed else untyped, table, issue)
            if kind is not None and typed:
                _check_qdq(n, g, issue)
            if n.op_type in GEMMS and typed:
                _check_gemm_inputs(n, g, issue)
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub.node, typed)

    walk(model.graph.node, typed=True)
    return issues
