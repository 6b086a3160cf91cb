"""Insert Q/DQ nodes into an exported ONNX graph from captured activations.

Two quantizers, picked by where the graph will run (`choose_quantizer`):
  * onnxruntime for INT8 graphs that run on onnxruntime (the CPU path), in one of two modes:
    static (the default): QDQ format, uint8 activations with calibrated (MinMax, asymmetric) ranges,
    per-channel symmetric int8 weights; everything else stays fp32. uint8 x int8 is what onnxruntime's
    fast kernels take (VNNI / AMX): int8 activations ran the bench denoiser 1.3x slower, and asymmetric
    ranges lose no bit on one-sided inputs (after GELU). Where the family declares it
    (ComponentDecl.static_int8_blocks_only), the layers outside the repeated blocks stay fp32 (`outside_blocks`). dynamic (`method="dynamic"`): per-channel int8 weights of
    the MatMuls (and Gemms) with constant weights only, activations quantized per call from their own range
    (DynamicQuantizeLinear + MatMulInteger, u8 x s8); the attention's activation x activation MatMuls
    stay fp32. Dynamic needs no ranges, but the quality gate still runs on the calibration set's
    held-out inputs and videos.
  * NVIDIA ModelOpt's ONNX PTQ (the tool TensorRT's own diffusion demo uses) for FP8 (float8e4m3fn),
    for INT8 bound for TensorRT, and for fp16 graphs. Outside the Q/DQ pairs the graph is cast to the
    `high_precision` type (fp16 for a TensorRT denoiser: its strongly typed engine keeps the graph's
    types; fp32 for T5, which overflows in fp16). ModelOpt pins onnx and pulls onnxruntime-gpu, which
    clash with the plain onnxruntime osx uses, so it lives in its own Python environment and runs as a
    subprocess (`modelopt_worker.py`); `modelopt_python` finds that environment.
onnxruntime's own FP8 mode is not used: measured here it gave a relative error of 1.46.

Both quantize the op types a transformer spends its time in (MatMul, Gemm, Conv), not just Conv.
ModelOpt itself leaves out GEMMs with K or N < 16 and convolutions with < 16 channels (TensorRT has no
faster 8-bit kernels for them).
"""

from __future__ import annotations

import ast
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from osx.bundle import EXTERNAL_DATA_BYTES
from osx.families import never_fp16
from osx.calibration.shards import ShardReader
from osx.errors import OsxError

PRECISIONS = ("int8", "fp8")
OP_TYPES = ("MatMul", "Gemm", "Conv")
MODELOPT_ENV = "OSX_MODELOPT_PYTHON"
WORKER = Path(__file__).with_name("modelopt_worker.py")


METHODS = ("static", "dynamic")  # INT8 on onnxruntime
INTEGER_OPS = {"MatMulInteger": "MatMul", "ConvInteger": "Conv"}  # what dynamic quantization runs them as


@dataclass(frozen=True)
class Quantizer:
    tool: str  # "onnxruntime" | "modelopt"
    high_precision: str  # "fp32" | "fp16": the type outside the Q/DQ pairs
    method: str = "static"  # onnxruntime only: "static" (calibrated Q/DQ) | "dynamic"

    def describe(self, precision: str) -> str:
        if self.tool == "onnxruntime" and self.method == "dynamic":
            return ("onnxruntime quantize_dynamic (int8 per-channel weights of constant-weight MatMuls, "
                    "uint8 activations quantized per call)")
        if self.tool == "onnxruntime":
            return ("onnxruntime quantize_static (QDQ: uint8 activations, MinMax asymmetric ranges; int8 symmetric "
                    "per-channel weights)")
        kind = "FP8 E4M3" if precision == "fp8" else "INT8"
        return f"NVIDIA ModelOpt ONNX PTQ ({kind}, max calibration, {self.high_precision} outside Q/DQ)"


def choose_quantizer(precision: str, component: str, backend: str, source_dtype: str, method: str = "static") -> Quantizer:
    """onnxruntime for INT8 run by onnxruntime from an fp32 graph; ModelOpt otherwise. TensorRT keeps a
    strongly typed graph's types, so its denoiser gets fp16 outside the Q/DQ pairs; T5 never (overflow).
    `method` "dynamic": onnxruntime's dynamic INT8, which only that case can run."""
    if method not in METHODS:
        raise OsxError(f"unknown INT8 method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    fp16 = source_dtype == "float16" or (backend == "tensorrt" and not never_fp16(component))
    if precision == "int8" and backend != "tensorrt" and not fp16:
        return Quantizer("onnxruntime", "fp32", method)
    if method == "dynamic":
        raise OsxError(f"dynamic INT8 runs on onnxruntime from an fp32 graph; {component} is {precision} for "
                       f"{backend} from a {source_dtype} graph",
                       hint="use --int8-method static (TensorRT gets ModelOpt's Q/DQ), or export that component "
                       "for onnxruntime in fp32")
    return Quantizer("modelopt", "fp16" if fp16 else "fp32")


@dataclass
class QuantResult:
    path: Path
    precision: str
    quantizer: Quantizer
    excluded: list[str] = field(default_factory=list)
    qdq: dict = field(default_factory=dict)  # count_qdq of the output


def quantize(src: str | os.PathLike, dst: str | os.PathLike, precision: str, shards: list[Path],
             exclude: list[str] = (), only: list[str] | None = None, op_types: tuple[str, ...] = OP_TYPES,
             cache: Path | None = None, quantizer: Quantizer | None = None) -> QuantResult:
    """Quantize `src` into `dst` with activation ranges from `shards` (ShardWriter files of its inputs).

    `exclude`: node names kept in full precision; `only`: if given, quantize just these nodes (the
    sensitivity search measures one layer at a time). `cache` (onnxruntime only): a JSON file of
    calibrated ranges, written on first use and reused after, so a sensitivity search calibrates once.
    `quantizer`: default, as for onnxruntime CPU (`choose_quantizer(precision, "", "onnxruntime", ...)`).
    """
    if precision not in PRECISIONS:
        raise OsxError(f"cannot quantize to {precision!r}", hint=f"choose one of {', '.join(PRECISIONS)}")
    src, dst = Path(src), Path(dst)
    if not shards:
        raise OsxError(f"no calibration samples for {src.name}", hint="run `osx calibrate` first and pass --calibration")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if quantizer is None:
        quantizer = choose_quantizer(precision, "", "onnxruntime", source_dtype(src))
    if quantizer.tool == "onnxruntime" and quantizer.method == "dynamic":
        _quantize_dynamic(src, dst, list(exclude), only)
    elif quantizer.tool == "onnxruntime":
        _quantize_onnxruntime(src, dst, shards, list(exclude), only, op_types, cache)
    else:
        _quantize_modelopt(src, dst, precision, shards, list(exclude), only, op_types, quantizer.high_precision)
    return QuantResult(dst, precision, quantizer, sorted(exclude), count_qdq(dst))


def source_dtype(path: Path) -> str:
    """The graph's float type ("float32" / "float16"), read off its float inputs."""
    floats = [d for d in graph_inputs(path).values() if d.startswith("float")]
    return "float16" if "float16" in floats else "float32"


@contextlib.contextmanager
def _quiet_root_logger(level: int = logging.ERROR):
    """Warnings through the root logger silenced for the block only: the caller's level is restored."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(before, level))
    try:
        yield
    finally:
        root.setLevel(before)


def _quantize_onnxruntime(src: Path, dst: Path, shards: list[Path], exclude: list[str], only: list[str] | None, op_types,
                   cache: Path | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # quantize_static warns about pre-processing on every call; shape inference is all it would add.
    with _quiet_root_logger():
        quantize_static(
            str(src), str(dst), ShardReader(shards, graph_inputs(src)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(op_types),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            nodes_to_quantize=only,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=_is_large(src),
            calibration_cache_path=cache,
            # This graph runs on onnxruntime (TensorRT gets ModelOpt's symmetric Q/DQ): asymmetric uint8
            # activations, measured on the bench denoiser: relative L2 0.082 vs 0.093 symmetric int8.
            # QuantizeBias False: biases stay float (quantized INT32 biases add DequantizeLinear nodes on
            # int32 inputs, which TensorRT's parser rejects, onnx-tensorrt#850; export/lint.py flags them).
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, "QuantizeBias": False},
        )


def _quantize_dynamic(src: Path, dst: Path, exclude: list[str], only: list[str] | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(
            str(src), str(dst),
            op_types_to_quantize=["MatMul"],  # (and Gemm, which it quantizes as a MatMul); Conv stays fp32
            per_channel=True,
            weight_type=QuantType.QInt8,  # u8 activations x s8 weights: the VNNI / AMX kernels
            nodes_to_exclude=exclude,
            nodes_to_quantize=only,
            use_external_data_format=_is_large(src),
            extra_options={"MatMulConstBOnly": True},  # weights only; attention scores stay fp32
        )


def _quantize_modelopt(src: Path, dst: Path, mode: str, shards: list[Path], exclude: list[str],
                       only: list[str] | None, op_types, high_precision: str) -> None:
    python = modelopt_python()
    with tempfile.TemporaryDirectory(prefix="osx-modelopt-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({
            "model": str(_private_copy(src, Path(tmp))), "output": str(dst), "mode": mode,
            "shards": [str(s) for s in shards], "inputs": graph_inputs(src),
            "op_types": list(op_types),
            # ModelOpt takes regexes (re.match); anchor and escape exact node names
            "nodes_to_exclude": [f"{re.escape(n)}$" for n in exclude],
            "nodes_to_quantize": None if only is None else [f"{re.escape(n)}$" for n in only],
            "high_precision": high_precision,
            "external_data": _is_large(src),
        }))
        proc = subprocess.run([python, str(WORKER), str(job)], capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise OsxError(f"ModelOpt {mode} quantization of {src.name} failed (exit {proc.returncode}):\n{tail}",
                       hint=f"the lines above are ModelOpt's; check its environment ({python}: "
                       "python -c 'import modelopt.onnx.quantization')")


def _private_copy(src: Path, folder: Path) -> Path:
    """`src` and its external data files copied into `folder`: ModelOpt rewrites the graph it is given in place
    (measured with 0.47: a bundle's denoiser.onnx came back 376 bytes shorter, failing the bundle's checksum)."""
    model = onnx.load(str(src), load_external_data=False)
    data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    for name in data | {src.name}:
        shutil.copy2(src.parent / name, folder / name)
    return folder / src.name


def modelopt_python() -> str:
    """The Python that has ModelOpt: $OSX_MODELOPT_PYTHON, this interpreter if it imports
    `modelopt.onnx`, or a virtualenv beside this one named `<this venv>-modelopt`."""
    if env := os.environ.get(MODELOPT_ENV):
        if not Path(env).is_file():
            raise OsxError(f"{MODELOPT_ENV}={env} does not exist", hint="point it at the python of the ModelOpt environment")
        return env
    import importlib.util

    if importlib.util.find_spec("modelopt") is not None:
        return sys.executable
    sibling = Path(sys.prefix + "-modelopt") / "bin" / "python"
    if sibling.is_file():
        return str(sibling)
    raise OsxError(
        "FP8 quantization needs NVIDIA ModelOpt, which is not installed",
        hint="ModelOpt pins onnx and onnxruntime-gpu, so give it its own environment: "
        f"python -m venv {sys.prefix}-modelopt && {sys.prefix}-modelopt/bin/pip install 'nvidia-modelopt[onnx]' "
        f"(found automatically there), or set {MODELOPT_ENV}=/path/to/its/bin/python",
    )


def modelopt_available() -> str | None:
    """Why FP8 is unavailable (None if it is)."""
    try:
        modelopt_python()
    except OsxError as e:
        return f"{e.message}; {e.hint}"
    return None


# --- graph inspection -------------------------------------------------------------------------------


def graph_inputs(path: Path) -> dict[str, str]:
    """The graph's inputs and their numpy dtype names. Shards hold float32 activations; an fp16 graph
    is fed them cast to float16."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name
            for i in model.graph.input if i.name not in inits}


def count_qdq(path: Path) -> dict:
    """Q/DQ nodes by element type, and the MatMul/Gemm/Conv nodes that run quantized: the proof of
    what was quantized. {"QuantizeLinear": {"INT8": 12}, "DequantizeLinear": {...}, "quantized_ops": {"MatMul": 5}}"""
    model = onnx.load(str(path), load_external_data=False)
    types = {i.name: i.data_type for i in model.graph.initializer}
    types |= {n.output[0]: a.t.data_type for n in model.graph.node if n.op_type == "Constant"
              for a in n.attribute if a.name == "value"}
    counts: dict = {"QuantizeLinear": collections.Counter(), "DequantizeLinear": collections.Counter()}
    dq_outputs = set()
    for n in model.graph.node:
        if n.op_type in counts:
            # The quantized element type is the zero point's (input 2); without a zero point it is the
            # Q node's output_dtype attribute (opset 21), else uint8.
            zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
            dtype = types[zp] if zp in types else _output_dtype(n)
            counts[n.op_type][onnx.TensorProto.DataType.Name(dtype)] += 1
            if n.op_type == "DequantizeLinear":
                dq_outputs.add(n.output[0])
    # A compute op runs in 8 bit when both its data and its weight (inputs 0 and 1) are dequantized.
    quantized = collections.Counter(n.op_type for n in model.graph.node
                                    if n.op_type in OP_TYPES and all(i in dq_outputs for i in n.input[:2]))
    quantized.update(INTEGER_OPS[n.op_type] for n in model.graph.node if n.op_type in INTEGER_OPS)  # dynamic INT8
    return {k: dict(v) for k, v in counts.items()} | {"quantized_ops": dict(quantized)}


def _output_dtype(node) -> int:
    for a in node.attribute:
        if a.name == "output_dtype" and a.i:
            return a.i
    return onnx.TensorProto.UINT8


def quantizable_nodes(path: Path, op_types: tuple[str, ...] = OP_TYPES) -> list[onnx.NodeProto]:
    model = onnx.load(str(path), load_external_data=False)
    return [n for n in model.graph.node if n.op_type in op_types]


def module_path(node: onnx.NodeProto) -> str:
    """The torch module a node came from, e.g. 'spatial_blocks.0.attn.qkv'.

    The dynamo exporter records cumulative name scopes in metadata ([..., 'blocks.0.attn', 'linear']:
    the last is the op); the TorchScript exporter names nodes '/blocks.0/attn/qkv/MatMul'.
    """
    meta = {p.key: p.value for p in node.metadata_props}
    if scopes := meta.get("pkg.torch.onnx.name_scopes"):
        scopes = ast.literal_eval(scopes)
        return scopes[-2] if len(scopes) >= 2 else ""
    if "/" in node.name:
        return ".".join(p for p in node.name.strip("/").split("/")[:-1])
    return ""


def layer_groups(path: Path, op_types: tuple[str, ...] = OP_TYPES) -> dict[str, list[str]]:
    """Quantizable node names grouped by layer, the unit the sensitivity search keeps in full precision.

    A layer is the child of a numbered block ('spatial_blocks.3.attn', 'block.0.layer.1.DenseReluDense'
    through nested numbered lists) or a top-level module ('x_embedder', 't_embedder', 'final_layer').
    The module path prefix shared by every node (the export wrapper's 'module') is dropped first. A node
    with no module groups under its own name.
    """
    nodes = quantizable_nodes(path, op_types)
    paths = {n.name: module_path(n).split(".") if module_path(n) else [] for n in nodes}
    common = os.path.commonprefix([p for p in paths.values() if p]) if any(paths.values()) else []
    while common and any(len(p) > len(common) and p[len(common)].isdigit() for p in paths.values()):
        common = common[:-1]  # keep the name of a numbered list ('block' of 'block.0')
    groups: dict[str, list[str]] = {}
    for name, parts in paths.items():
        key = ".".join(_layer_key(parts[len(common):] if len(parts) > len(common) else parts)) or name
        groups.setdefault(key, []).append(name)
    return groups


def outside_blocks(path: Path, op_types: tuple[str, ...] = OP_TYPES) -> dict[str, list[str]]:
    """The layer groups outside the model's repeated (numbered) blocks: embedders of the latent, the timestep,
    the fps and the caption, and the final layer. Static INT8 keeps them in fp32: they are a small share of a
    step (per-sample vectors, or one projection in or out) but, measured on the bench denoiser, its most
    sensitive layers (quantized alone: final_layer rel. L2 0.038, fps_embedder 0.024, t_block 0.023, the
    latent's range varies 3.5x with the timestep); keeping them took the whole graph from 0.082 to 0.066."""
    return {k: v for k, v in layer_groups(path, op_types).items() if not any(p.isdigit() for p in k.split("."))}


def _layer_key(parts: list[str]) -> list[str]:
    if len(parts) >= 3 and parts[1].isdigit():  # spatial_blocks.3.attn, not t_block.1 (a Linear)
        end = 3
        while end + 1 < len(parts) and parts[end].isdigit():  # block.0.layer.1.DenseReluDense
            end += 2
        return parts[:end]
    return parts[:1]


def _is_large(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    external = any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    return external or path.stat().st_size > EXTERNAL_DATA_BYTES
