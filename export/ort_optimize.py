"""The onnxruntime graph of a component: fusions onnxruntime's own session optimizer does not find, done
once at export and saved beside the portable graph.

onnxruntime's level-all optimizer (run at every session start) fuses LayerNormalization and
MatMul+Add, but not the exported forms of GELU(tanh), RMSNorm or the residual Add + LayerNorm. The fusion
passes of `onnxruntime.transformers` do (FastGelu with its bias, SimplifiedLayerNormalization,
SkipLayerNormalization). Measured on the benchmark's "small" denoiser (scripts/bench_runtime.py): 1155
-> 987 nodes and about 1.2x per step; outputs within 3e-6 of the unfused graph. The exporter checks the
fused graph against the portable one (`add_onnxruntime_graph`); tests/test_exporter.py against PyTorch.

The fused graph uses com.microsoft operators, which TensorRT does not parse, so it is a second file:
`<component>.ort.onnx`, which the onnxruntime backend runs; `<component>.onnx` stays the portable graph
that `osx build` and calibration read. onnxruntime's INT8 Q/DQ graphs are fused the same way
(osx.calibration.apply), and the quality gate judges the fused graph. Large weights are not copied: the fused graph refers to the
portable graph's external data file (`<component>.onnx.data`) where it has one.

Attention: onnxruntime's attention fusions look for BERT/UNet projections and masks, not the exported
scaled_dot_product_attention with QK-norm and RoPE; `osx.export.ort_attention` fuses that form (self
attention, and cross attention with its key padding mask) into com.microsoft MultiHeadAttention.
T5's attention (relative position bias) stays unfused.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from osx.export.ort_attention import fuse_attention

SUFFIX = ".ort.onnx"
FUSED_OPS = ("FastGelu", "BiasGelu", "Gelu", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
             "LayerNormalization", "SkipLayerNormalization", "MultiHeadAttention")


def fusion_options():
    """GELU, RMSNorm, LayerNorm and residual-add fusions; nothing that changes the arithmetic
    (no GELU approximation) or assumes BERT's structure (embedding layer, attention masks)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_gelu_approximation = False
    options.enable_attention = False  # would look for BERT's mask form; see the module docstring
    options.enable_rotary_embeddings = False
    options.enable_embed_layer_norm = False
    options.enable_qordered_matmul = False  # for graphs already quantized in the "ordered" CUDA layout
    return options


def optimize_for_onnxruntime(src: str | Path, dst: str | Path, attention: bool = True) -> dict:
    """Write the fused graph of `src` to `dst` (same folder, so external data paths stay valid);
    `attention`: fuse attention too (osx.export.ort_attention).
    Returns {"nodes": [before, after], "fused": {op: count}, "attention_unfused": count}."""
    from onnxruntime.transformers.optimizer import optimize_model

    src, dst = Path(src), Path(dst)
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError("the fused graph must sit beside the portable one (it shares its external data file)")
    model = onnx.load(src, load_external_data=False)
    _load_small_external_tensors(model, src.parent)
    _give_layer_norms_a_bias(model)
    before = len(model.graph.node)
    # num_heads/hidden_size 0: read off the graph where a fusion needs them; no attention fusion uses them here.
    with _quiet():
        optimized = optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                                   optimization_options=fusion_options(), use_gpu=False)
    swaps = pair_swaps_as_split_concat(optimized.model)
    left = fuse_attention(optimized.model)["attention_left"] if attention else None
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        onnx.save(optimized.model, tmp)  # external initializers stay references to src's data file
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    counts = Counter(n.op_type for n in optimized.model.graph.node)
    return {"nodes": [before, len(optimized.model.graph.node)], "fused": {op: counts[op] for op in FUSED_OPS if counts[op]},
            "attention_unfused": left, "pair_swaps": swaps}


def pair_swaps_as_split_concat(model: onnx.ModelProto) -> int:
    """Rewrite each Gather along the last axis by the pair swap (1, 0, 3, 2, ...) (RoPE's rotate step,
    osx.export.stdit3.apply_rope) as Reshape [-1, 2] -> Split -> Concat(odd, even) -> Reshape back: the same
    values moved, and onnxruntime's Split/Concat copy them about 5x faster than its Gather (4.3 % of the
    bench denoiser's step as Gather). Returns the count rewritten."""
    from onnx import helper, numpy_helper

    consts = {t.name: t for t in model.graph.initializer}
    pairs = "pair_swap_rows_of_2"
    rewritten, nodes = 0, []
    for node in model.graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        idx = consts.get(node.input[1]) if node.op_type == "Gather" and len(node.input) == 2 else None
        swap = numpy_helper.to_array(idx) if idx is not None else None
        if swap is None or swap.ndim != 1 or swap.size % 2 or axis != -1 or \
                not np.array_equal(swap, np.arange(swap.size).reshape(-1, 2)[:, ::-1].reshape(-1)):
            nodes.append(node)
            continue
        if not rewritten:
            model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 2], np.int64), pairs))
        x, y, n = node.input[0], node.output[0], node.name or y
        nodes += [helper.make_node("Shape", [x], [f"{n}/shape"], name=f"{n}/shape"),
                  helper.make_node("Reshape", [x, pairs], [f"{n}/pairs"], name=f"{n}/pairs"),
                  helper.make_node("Split", [f"{n}/pairs"], [f"{n}/even", f"{n}/odd"], name=f"{n}/split", axis=1, num_outputs=2),
                  helper.make_node("Concat", [f"{n}/odd", f"{n}/even"], [f"{n}/swapped"], name=f"{n}/concat", axis=1),
                  helper.make_node("Reshape", [f"{n}/swapped", f"{n}/shape"], [y], name=f"{n}/back")]
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return rewritten


def _load_small_external_tensors(model: onnx.ModelProto, folder: Path) -> None:
    """Read external scalars and vectors into the graph: the fusions check constants (GELU's 0.044715,
    a norm's exponent and epsilon) and biases by value. Matrices (the weights) stay on disk."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in model.graph.initializer:
        if uses_external_data(t) and len(t.dims) <= 1:
            load_external_data_for_tensor(t, str(folder))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]


def _give_layer_norms_a_bias(model: onnx.ModelProto) -> None:
    """A zero bias for each LayerNormalization that has none (the MMDiT's affine-free norms export their
    scale only): onnxruntime's SkipLayerNormalization fusion reads input 2 and fails without it; x*s + 0 is
    the same arithmetic."""
    from onnx import numpy_helper

    scales = {t.name: t for t in model.graph.initializer}
    biases = {}
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or (len(node.input) > 2 and node.input[2]) or node.input[1] not in scales:
            continue
        if node.input[1] not in biases:
            zeros = np.zeros_like(numpy_helper.to_array(scales[node.input[1]]))
            biases[node.input[1]] = numpy_helper.from_array(zeros, f"{node.input[1]}.zero_bias")
            model.graph.initializer.append(biases[node.input[1]])
        del node.input[2:]
        node.input.append(biases[node.input[1]].name)


@contextlib.contextmanager
def _quiet():
    """The fusion passes log every pattern they try and print progress bars; keep export output readable."""
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def add_onnxruntime_graph(folder: Path, component: str, portable: str, io, tolerance: float) -> dict:
    """For the exporter: fuse `folder/portable` into `<component>.ort.onnx` and check it against the
    portable graph (just validated against PyTorch) at the validation shapes, within the same tolerance;
    the tests compare the fused graph with PyTorch directly. Returns the manifest keys to add."""
    fused = f"{component}{SUFFIX}"
    stats = optimize_for_onnxruntime(folder / portable, folder / fused)
    try:
        rows = check_against(folder / fused, folder / portable, io, tolerance)
    except BaseException:
        (folder / fused).unlink(missing_ok=True)
        raise
    return {"onnxruntime_file": fused, "onnxruntime_graph": {**stats, "check": "against the portable graph", "rows": rows}}


def check_against(fused: Path, portable: Path, io, tolerance: float) -> list[dict]:
    """compare_onnx rows of `fused` vs `portable`'s outputs (raises ValidationError above `tolerance`)."""
    import onnxruntime as ort

    from osx.export.validate import Case, compare_onnx, validation_shapes

    session = ort.InferenceSession(str(portable), providers=["CPUExecutionProvider"])
    names = [t.name for t in io.outputs]
    cases = []
    for i, sizes in enumerate(validation_shapes(io)):
        inputs = io.sample_inputs(sizes, seed=i)
        cases.append(Case(dict(sizes), inputs, dict(zip(names, session.run(names, inputs)))))
    del session
    return compare_onnx(fused, io, cases, "fp32", tolerance)
