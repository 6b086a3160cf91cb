"""Attention fusion for onnxruntime: the exported scaled_dot_product_attention as com.microsoft
MultiHeadAttention, done once at export (osx.export.ort_optimize).

onnxruntime's own attention fusions (onnxruntime.transformers: BERT, UNet) look for the projections and
mask forms of those models; the STDiT3 normalises Q and K (RMSNorm), rotates them (RoPE) and masks
padded text keys with an additive bias, so they find nothing. The part they all share is what this
pass matches, from the Softmax outwards, as torch.onnx.export (dynamo, opset 18-20) writes it:

    MatMul(Mul(Q, a), Mul(K^T, b)) [+ key bias] -> Softmax(-1) -> MatMul(., V) -> Transpose(0,2,1,3) -> Reshape

Q, K, V are [B, heads, tokens, head_dim]. The replacement is MultiHeadAttention(Q as [B, N, C], K, V
as they are (BNSH), scale a*b) whose output is the Reshape's. The key bias is fused only in the form
the STDiT3 writes it, `((mask - 1) * c)[:, None, None, :]`: a key padding mask with mask_filter_value
-c, the same arithmetic for a 0/1 mask; any other bias (T5's relative positions) is left unfused.
Every match is structural and exact; the exporter still checks the result numerically.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

DOMAIN = "com.microsoft"


def fuse_attention(model: onnx.ModelProto) -> dict:
    """Fuse in place; returns {"MultiHeadAttention": fused, "attention_left": unfused Softmax count}."""
    g = _Graph(model)
    fused = 0
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        fused += _fuse_one(g, softmax)
    if fused:
        g.sweep()
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    left = sum(1 for n in model.graph.node if n.op_type == "Softmax")
    return {"MultiHeadAttention": fused, "attention_left": left}


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.consts = {i.name: i for i in self.graph.initializer}
        self.consts |= {n.output[0]: a.t for n in self.graph.node if n.op_type == "Constant"
                        for a in n.attribute if a.name == "value"}
        self.shapes = {v.name: v.type.tensor_type for v in [*self.graph.value_info, *self.graph.input, *self.graph.output]}
        self.masks: dict[str, str] = {}  # mask tensor -> its int32 cast
        self.index()

    def index(self):
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def only(self, name: str, op: str):
        """The single consumer of `name` if it is an `op` node (and `name` no graph output)."""
        users = self.consumers.get(name, [])
        outputs = {o.name for o in self.graph.output}
        return users[0] if len(users) == 1 and users[0].op_type == op and name not in outputs else None

    def made_by(self, name: str, op: str):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def scalar(self, name: str) -> float | None:
        t = self.consts.get(name)
        if t is None:
            return None
        v = numpy_helper.to_array(t)
        return float(v.reshape(-1)[0]) if v.size == 1 else None

    def rank(self, name: str) -> int | None:
        t = self.shapes.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    def dim(self, name: str, axis: int) -> int | None:
        t = self.shapes.get(name)
        return t.shape.dim[axis].dim_value or None if t is not None and t.HasField("shape") else None

    def elem_type(self, name: str) -> int | None:
        t = self.shapes.get(name)
        return t.elem_type if t is not None else None

    def sweep(self):
        """Drop nodes nothing reads (the matched chains, shape computations only they used), then
        order the rest topologically (fused nodes were appended)."""
        outputs = {o.name for o in self.graph.output}
        nodes = list(self.graph.node)
        while True:
            used = {i for n in nodes for i in n.input} | outputs
            kept = [n for n in nodes if any(o in used for o in n.output)]
            if len(kept) == len(nodes):
                break
            nodes = kept
        ready = {i.name for i in self.graph.input} | set(self.consts) | {""}
        ordered, pending = [], nodes
        while pending:
            rest = []
            for n in pending:
                if all(i in ready for i in n.input):
                    ordered.append(n)
                    ready.update(n.output)
                else:
                    rest.append(n)
            if len(rest) == len(pending):
                raise ValueError("attention fusion left a cycle or a dangling input")
            pending = rest
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        used = {i for n in ordered for i in n.input}
        kept = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)
        self.index()


def _scaled(g: _Graph, name: str) -> tuple[str, float]:
    """(x, a) where `name` is Mul(x, a) with a scalar constant a, else (name, 1.0)."""
    mul = g.made_by(name, "Mul")
    if mul is not None and g.only(name, "MatMul") is not None:
        for x, c in (mul.input, mul.input[::-1]):
            if (a := g.scalar(c)) is not None:
                return x, a
    return name, 1.0


def _transposed_key(g: _Graph, name: str) -> str | None:
    """K where `name` is K^T (last two axes swapped): Transpose(K, 0,1,3,2), or dynamo's
    Reshape(Transpose(Reshape(K, [-1, L, D]), 0,2,1), [B, H, D, L])."""
    t = g.made_by(name, "Transpose")
    if t is not None and _perm(t) == [0, 1, 3, 2]:
        return t.input[0]
    outer = g.made_by(name, "Reshape")
    t = outer and g.made_by(outer.input[0], "Transpose")
    inner = t and _perm(t) == [0, 2, 1] and g.made_by(t.input[0], "Reshape")
    if inner and g.rank(inner.input[0]) == 4 and g.rank(inner.output[0]) in (3, None):
        return inner.input[0]
    return None


def _key_padding(g: _Graph, bias: str) -> tuple[str, float] | None:
    """(int32 mask, mask_filter_value) where `bias` is ((Cast(mask) - 1) * c) unsqueezed to [B, 1, 1, L]."""
    unsq = g.made_by(bias, "Unsqueeze")
    if unsq is None or g.rank(bias) not in (4, None):
        return None
    axes = g.consts.get(unsq.input[1]) if len(unsq.input) > 1 else None
    if axes is None or sorted(numpy_helper.to_array(axes).tolist()) != [1, 2]:
        return None
    mul = g.made_by(unsq.input[0], "Mul")
    if mul is None:
        return None
    for x, c in (mul.input, mul.input[::-1]):
        sub, scale = g.made_by(x, "Sub"), g.scalar(c)
        if sub is None or scale is None or scale <= 0 or g.scalar(sub.input[1]) != 1.0:
            continue
        cast = g.made_by(sub.input[0], "Cast")
        if cast is None:
            continue
        mask = cast.input[0]
        if mask not in g.masks:
            g.masks[mask] = f"{mask}_int32"
            g.graph.node.append(helper.make_node("Cast", [mask], [g.masks[mask]], name=f"{mask}_to_int32",
                                                 to=onnx.TensorProto.INT32))
        return g.masks[mask], -scale
    return None


def _perm(node) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def _fuse_one(g: _Graph, softmax) -> int:
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    scores = softmax.input[0]
    if axis != -1 or g.rank(scores) != 4 or g.elem_type(scores) != onnx.TensorProto.FLOAT:
        return 0
    padding, qk = None, g.made_by(scores, "MatMul")
    add = g.made_by(scores, "Add")
    if add is not None:
        for x, bias in (add.input, add.input[::-1]):
            if g.made_by(x, "MatMul") is not None and g.only(x, "Add") is not None:
                padding, qk = _key_padding(g, bias), g.made_by(x, "MatMul")
                break
        if padding is None:
            return 0
    if qk is None or g.only(scores, "Softmax") is None:
        return 0
    q, a = _scaled(g, qk.input[0])
    kt, b = _scaled(g, qk.input[1])
    k = _transposed_key(g, kt)
    pv = g.only(softmax.output[0], "MatMul")
    if k is None or pv is None or pv.input[0] != softmax.output[0]:
        return 0
    v = pv.input[1]
    out_t = g.only(pv.output[0], "Transpose")
    out_r = out_t and _perm(out_t) == [0, 2, 1, 3] and g.only(out_t.output[0], "Reshape")
    heads = g.dim(q, 1)
    if not out_r or heads is None or any(g.rank(x) != 4 for x in (q, k, v)) or g.rank(out_r.output[0]) != 3:
        return 0

    # The query goes in as [B, N, heads * head_dim]; K and V stay [B, heads, L, head_dim] (no copy). Measured
    # on the bench model: the same outputs to the bit as the unfused graph. (3-D K/V would take
    # onnxruntime's CPU flash-attention path, which is slower at these sequence lengths.)
    name = softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention"
    flat = f"{name}/shape_bsd"
    g.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), flat))
    g.consts[flat] = g.graph.initializer[-1]
    inputs = [f"{name}/q_bsd", k, v] + (["", padding[0]] if padding else [])
    attrs = {"num_heads": heads, "scale": a * b} | ({"mask_filter_value": padding[1]} if padding else {})
    g.graph.node.extend([
        helper.make_node("Transpose", [q], [f"{name}/q_bsnh"], name=f"{name}/q_to_bsnh", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{name}/q_bsnh", flat], [f"{name}/q_bsd"], name=f"{name}/q_to_bsd"),
        helper.make_node("MultiHeadAttention", inputs, [out_r.output[0]], name=name, domain=DOMAIN, **attrs)])
    out_r.output[0] = f"{name}/replaced"  # the old chain now ends in nothing; sweep() drops it
    return 1
