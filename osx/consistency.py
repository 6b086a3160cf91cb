"""A manifest's internal consistency, beyond its schema and checksums (`osx bundle verify`, and
`Pipeline.load` for the manifest-only part): every component's dimension ranges are ordered
(1 <= min <= opt <= max), its tensor dtypes are ones the runtime knows, and its inputs and outputs are
the ONNX graph's own, by name and element type. An edited manifest then fails verification instead of
crashing `generate` or failing deep in onnxruntime."""

from __future__ import annotations

from pathlib import Path

from osx.errors import BundleError

DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")
# ONNX TensorProto.DataType numbers -> the manifest's dtype names
ONNX_ELEM_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 3: "int8", 2: "uint8", 9: "bool"}
# onnxruntime's type strings -> the manifest's dtype names
ORT_TYPES = {f"tensor({'float' if d == 'float32' else d})": d for d in DTYPES}
_FIX = "the manifest was edited or is corrupt; re-export the bundle (osx export) or copy it again"


def check_manifest(manifest: dict, where: Path | str) -> None:
    """Ranges and dtypes of every component's `io`. Raises BundleError naming the component and field."""
    for name, comp in manifest["components"].items():
        io = comp.get("io")
        try:
            dims = dict(io["dims"])
            tensors = [("input", t) for t in io["inputs"]] + [("output", t) for t in io["outputs"]]
        except (KeyError, TypeError) as e:
            raise BundleError(f"{where}: component {name!r}: io lacks {e}", hint=_FIX) from None
        for dim, r in dims.items():
            try:
                lo, opt, hi = (r[k] for k in ("min", "opt", "max"))
                ordered = all(type(v) is int for v in (lo, opt, hi)) and 1 <= lo <= opt <= hi
            except (KeyError, TypeError):
                ordered, lo, opt, hi = False, "?", "?", "?"
            if not ordered:
                raise BundleError(f"{where}: component {name!r}: range of {dim!r} is min={lo} opt={opt} max={hi}; "
                                  "it must be whole numbers with 1 <= min <= opt <= max", hint=_FIX)
        for kind, t in tensors:
            dtype = t.get("dtype") if isinstance(t, dict) else None
            if dtype not in DTYPES:
                raise BundleError(f"{where}: component {name!r}: {kind} {t.get('name') if isinstance(t, dict) else t!r} "
                                  f"has dtype {dtype!r}; known: {', '.join(DTYPES)}", hint=_FIX)


def graph_io(onnx_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({input name: dtype}, {output name: dtype}) declared by an ONNX graph, initializers excluded.
    Reads the graph without its weights (onnx, when installed) or through onnxruntime."""
    try:
        import onnx
    except ImportError:
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        return ({i.name: ORT_TYPES.get(i.type, i.type) for i in session.get_inputs()},
                {o.name: ORT_TYPES.get(o.type, o.type) for o in session.get_outputs()})
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}

    def named(values):
        return {v.name: ONNX_ELEM_TYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type))
                for v in values if v.name not in weights}

    return named(graph.input), named(graph.output)


def check_graphs(root: Path, manifest: dict) -> None:
    """Each component's ONNX file declares exactly the manifest's inputs and outputs, with its dtypes."""
    for name, comp in manifest["components"].items():
        if not str(comp.get("file", "")).endswith(".onnx"):
            continue
        try:
            declared = graph_io(root / comp["file"])
        except Exception as e:  # noqa: BLE001 - onnx / onnxruntime raise their own types for unreadable graphs
            raise BundleError(f"{root}: cannot read the graph {comp['file']}: {e}", hint=_FIX) from None
        for kind, graph, listed in (("inputs", declared[0], comp["io"]["inputs"]), ("outputs", declared[1], comp["io"]["outputs"])):
            manifest_side = {t["name"]: t["dtype"] for t in listed}
            if manifest_side != graph:
                diff = sorted(f"{n}: manifest {manifest_side.get(n, 'absent')}, graph {graph.get(n, 'absent')}"
                              for n in set(manifest_side) | set(graph) if manifest_side.get(n) != graph.get(n))
                raise BundleError(f"{root}: component {name!r}: the manifest's {kind} disagree with {comp['file']}: "
                                  + "; ".join(diff), hint=_FIX)
