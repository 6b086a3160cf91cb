"""Depth-independent tracing: trace a model with 3 of its repeated blocks, then copy the last block's ONNX
nodes until the graph has the model's full depth.

Why: torch.export and the exporter's decompositions cost more per block the deeper the model (symbolic
shape arithmetic over ever more nodes): measured on the real-width STDiT3, 9 / 15 / 49 / 84 s of CPU to
convert 1 / 2 / 4 / 8 blocks, ~850 s for its 28. Three blocks cost the same at any depth, and copying
nodes costs milliseconds.

Why three: block 0 differs from the others (later blocks reuse shape computations it made first), so the
last two traced blocks, 1 and 2, are the repeating pair. Each copy j of block 2 takes
  - a value block 2 made itself  -> copy j's own (renamed) value,
  - a value block 1 made         -> the previous instance's value at the same position (the block chain),
  - any other value (inputs, block 0's shared shapes, constants) -> the same value,
  - a weight `module.<blocks>.2.<rest>` -> the initializer `module.<blocks>.<j>.<rest>`, whose checkpoint key
    `osx.export.stream.stream_initializers` then looks up by that name (a gap is an error naming the key).
Whatever used block 2's values after it uses the last copy's. Blocks 1 and 2 must be the same ops in
the same order with the same attributes (checked); nodes keep their module scope, renumbered, so node
names and calibration's layer groups read as a full trace's. The result is the graph a full-depth trace
gives (tests/test_repeat.py: same onnxruntime outputs and initializers as the full trace).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import onnx_ir as ir
import torch

from osx.errors import OsxError

TRACED = 3  # blocks traced per repeated kind
SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass
class Repeat:
    """How to export a deep model: trace `module` (the model with TRACED blocks of each repeated kind, on
    the meta device), then repeat each kind's last block up to its full depth."""

    module: torch.nn.Module
    blocks: tuple[tuple[tuple[str, ...], int], ...]  # (module lists of one kind, full depth) per kind

    def apply(self, graph: ir.Graph) -> int:
        return sum(repeat_blocks(graph, prefixes, full) for prefixes, full in self.blocks)


def block_index(node: ir.Node, prefixes: tuple[str, ...]) -> int | None:
    """The block (of the module lists named `prefixes`) a node belongs to, from its module scopes."""
    for scope in ast.literal_eval(node.metadata_props.get(SCOPES, "[]")):
        for prefix in prefixes:
            m = re.fullmatch(rf"(?:.*\.)?{re.escape(prefix)}\.(\d+)", scope)
            if m:
                return int(m.group(1))
    return None


def repeat_blocks(graph: ir.Graph, prefixes: tuple[str, ...], full: int) -> int:
    """Insert copies of the last of TRACED traced blocks (module lists `prefixes`, e.g. STDiT3's spatial and
    temporal blocks, counted together) until the graph has `full` of them. Returns the copies made."""
    nodes = list(graph)
    index = [block_index(n, prefixes) for n in nodes]
    spans = {}
    for i, b in enumerate(index):
        if b is not None:
            spans.setdefault(b, []).append(i)
    if sorted(spans) != list(range(TRACED)):
        raise OsxError(f"cannot repeat blocks {'/'.join(prefixes)}: traced blocks {sorted(spans)}, expected 0..{TRACED - 1}")
    prev, last = ([nodes[i] for i in spans[b]] for b in (TRACED - 2, TRACED - 1))
    if spans[TRACED - 1][0] != spans[TRACED - 2][-1] + 1 or any(
            spans[b][-1] - spans[b][0] + 1 != len(spans[b]) for b in spans):
        raise OsxError(f"cannot repeat blocks {'/'.join(prefixes)}: their nodes are not consecutive in the graph")
    if [_signature(n) for n in prev] != [_signature(n) for n in last]:
        raise OsxError(f"cannot repeat blocks {'/'.join(prefixes)}: blocks {TRACED - 2} and {TRACED - 1} trace to different graphs")
    made_by_prev = {o: i for i, n in enumerate(prev) for o in n.outputs}
    made_by_last = {o for n in last for o in n.outputs}

    instance = {o: o for n in last for o in n.outputs}  # block 2's value -> its counterpart in the newest instance
    anchor, copies = last[-1], set()
    for j in range(TRACED, full):
        copy: dict[ir.Value, ir.Value] = {}
        new_nodes = []
        for node in last:
            inputs = [_input(v, j, copy, made_by_last, made_by_prev, last, instance, graph, prefixes) for v in node.inputs]
            new = ir.Node(node.domain, node.op_type, inputs, [_copy_attr(a) for a in node.attributes.values()],
                          overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                          name=f"{_renumber(node.name, prefixes, j)}__{j}", doc_string=node.doc_string,
                          metadata_props={k: _renumber(v, prefixes, j) for k, v in node.metadata_props.items()})
            for old, out in zip(node.outputs, new.outputs):
                out.name = f"{old.name}__{j}"
                out.type, out.shape = old.type, old.shape
                copy[old] = out
            new_nodes.append(new)
        graph.insert_after(anchor, new_nodes)
        copies.update(new_nodes)
        anchor = new_nodes[-1]
        instance = copy
    for old, newest in instance.items():  # what came after block 2 reads the last copy
        if old is not newest:
            _replace_later_uses(old, newest, set(last) | copies)
    return max(0, full - TRACED)


def _input(v, j, copy, made_by_last, made_by_prev, last, instance, graph, prefixes):
    if v is None:
        return None
    if v in made_by_last:
        return copy[v]
    if v in made_by_prev:  # block 1's value at this position -> the previous instance's
        i = made_by_prev[v]
        producer = v.producer()
        return instance[last[i].outputs[producer.outputs.index(v)]]
    if v.is_initializer() and block_index_of_name(v.name, prefixes) == TRACED - 1:
        name = _renumber(v.name, prefixes, j)
        if name not in graph.initializers:
            graph.register_initializer(ir.Value(name=name, type=v.type, shape=v.shape, const_value=v.const_value))
        return graph.initializers[name]
    return v


def block_index_of_name(name: str, prefixes: tuple[str, ...]) -> int | None:
    for prefix in prefixes:
        m = re.search(rf"(?:^|\.){re.escape(prefix)}\.(\d+)\.", name)
        if m:
            return int(m.group(1))
    return None


def _renumber(text: str | None, prefixes: tuple[str, ...], j: int) -> str | None:
    """Block TRACED-1's module names in `text` (a node name, a scope list, a weight name) as block j's."""
    if not text:
        return text
    for prefix in prefixes:
        for sep in (".", "/"):
            p = prefix.replace(".", sep)
            text = re.sub(rf"(^|[^\w]){re.escape(p)}{re.escape(sep)}{TRACED - 1}(?=$|[^\w])", rf"\g<1>{p}{sep}{j}", text)
    return text


def _signature(node: ir.Node):
    attrs = tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items()))
    return node.domain, node.op_type, node.overload, len(node.inputs), len(node.outputs), attrs


def _copy_attr(attr: ir.Attr) -> ir.Attr:
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise OsxError(f"cannot repeat a block whose nodes hold subgraphs (attribute {attr.name})")
    return ir.Attr(attr.name, attr.type, attr.value, ref_attr_name=attr.ref_attr_name, doc_string=attr.doc_string)


def _replace_later_uses(old: ir.Value, new: ir.Value, repeated: set) -> None:
    if old.is_graph_output():
        raise OsxError(f"cannot repeat a block whose value {old.name} is a graph output")
    for user, i in list(old.uses()):
        if user not in repeated:
            user.replace_input_with(i, new)
