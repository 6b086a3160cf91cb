"""Exported ONNX vs PyTorch: onnxruntime (CPU) against the torch module at two or more shapes.

The shapes lie inside the spec's dynamic ranges and differ in every dynamic dimension, one of them at
every minimum, so a dimension the export baked in as a constant (or a shape assertion it dropped, see
onnx_export.trace) fails here. Error per output: max |onnx - torch| and that divided by max |torch|
(relative to the output's scale, so an output near zero somewhere does not blow the figure up).
Tolerances: fp32 1e-4, fp16 1e-2 of the scale; beyond it a ValidationError names component, output,
shape and error.

Torch runs the module as exported (same dtype), so the check measures the export, not fp16 rounding
against fp32. But two fp16 implementations differ by more than 1e-2 on a deep model: measured on the
real-size STDiT3 (56 blocks, random weights), PyTorch's own fp16 run is 1.3-2.2e-2 of the scale off its
fp32 run, and onnxruntime's fp16 run 1.6e-2 off PyTorch's. So where the fp32 outputs are known
(`fp16_noise`), the fp16 tolerance is max(1e-2, 2 x PyTorch's fp16-vs-fp32 error): the graph may differ
from PyTorch-fp16 by twice PyTorch-fp16's own distance from fp32; an export bug is far beyond that.

`torch_reference` and `compare_onnx` are the two halves of `validate_component`, so an exporter can
drop the torch weights before onnxruntime loads the graph (peak = one copy of the weights).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from osx.components import ComponentSpec
from osx.errors import ValidationError
from osx.export.onnx_export import DTYPES, SpecModule

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


@dataclass
class Case:
    """One validation shape: the inputs and the torch outputs for them."""

    sizes: dict[str, int]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]


def validation_shapes(spec: ComponentSpec) -> list[dict[str, int]]:
    """Two shapes: every dim at its minimum; then every dim a little above it and each a different
    size (min + 2 + its index, capped at opt, or at max where opt is the minimum), so swapped or
    baked-in dimensions show. Small on purpose: the real denoiser runs them on a CPU."""
    low = {d: r.min for d, r in spec.dims.items()}
    high = {}
    for i, (d, r) in enumerate(spec.dims.items()):
        cap = r.opt if r.opt > r.min else r.max
        high[d] = min(r.min + 2 + i, cap)
    return [low, high] if high != low else [low]


def torch_reference(module: torch.nn.Module, spec: ComponentSpec, shapes: list[dict[str, int]], dtype: str,
                    adapter=None) -> list[Case]:
    """Run the module as `spec` (at `dtype`; `adapter`: the family's forward adapter, see SpecModule) on
    seeded sample inputs at each shape."""
    spec = spec.with_precision(DTYPES[dtype][0])
    wrapper = SpecModule(module, spec, adapter).eval()
    cases = []
    for i, sizes in enumerate(shapes):
        inputs = spec.sample_inputs(sizes, seed=i)
        with torch.no_grad():
            out = wrapper(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
        out = out if isinstance(out, (tuple, list)) else (out,)
        expected = {t.name: o.detach().float().numpy() for t, o in zip(spec.outputs, out)}
        cases.append(Case(dict(sizes), inputs, expected))
    return cases


def fp16_noise(fp32_cases: list[Case], fp16_cases: list[Case]) -> float:
    """PyTorch's own fp16 error: max over shapes and outputs of max|fp16 - fp32| / max|fp32|."""
    worst = 0.0
    for c32, c16 in zip(fp32_cases, fp16_cases):
        for name, ref in c32.expected.items():
            scale = float(np.abs(ref).max()) or 1.0
            worst = max(worst, float(np.abs(c16.expected[name].astype(np.float64) - ref).max()) / scale)
    return worst


def fp16_tolerance(noise: float) -> float:
    return max(TOLERANCE["fp16"], 2 * noise)


def compare_onnx(onnx_path: str | os.PathLike, spec: ComponentSpec, cases: list[Case], dtype: str,
                 tolerance: float | None = None) -> list[dict]:
    """Run the ONNX file with onnxruntime on each case's inputs; one row per (shape, output).
    Raises ValidationError (with `.rows`) if any output is off by more than the tolerance."""
    import onnxruntime as ort

    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's warnings (e.g. unused initializers) are not ours
    # No repacked second copy of the weights (measured on the fp16 STDiT3: 6.2 -> 5.8 GB peak); the
    # validation shapes are small, so the packed kernels would not pay off anyway.
    options.add_session_config_entry("session.disable_prepacking", "1")
    # The graph as written, no graph optimizations: onnxruntime's CPU provider has no fp16 kernels for most
    # ops, and with optimizations on it folds the Casts it inserts, holding every fp16 weight as a second,
    # fp32 copy; without, the weights stay memory-mapped and are cast node by node. Measured on the real
    # MMDiT's fp16 validation cut (1 + 1 blocks, 1.07 GB): peak 3.21 -> 2.45 GiB. At the validation shapes
    # the optimizations would save seconds at most.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.outputs]
    rows, bad = [], []
    for case in cases:
        actual = dict(zip(names, session.run(names, case.inputs)))
        for name in names:
            row = _compare(spec.name, case.sizes, name, case.expected[name], actual[name], tol, dtype)
            rows.append(row)
            if not row["ok"]:
                bad.append(row)
    del session
    if bad:
        worst = max(bad, key=lambda r: r["max_rel"] if np.isfinite(r["max_rel"]) else np.inf)
        err = ValidationError(
            f"{spec.name}: ONNX output {worst['output']!r} differs from PyTorch by {worst['max_rel']:.3g} of its scale "
            f"(max abs {worst['max_abs']:.3g}{', ' + worst['note'] if worst['note'] else ''}) at {_sizes(worst['shape'])}; "
            f"tolerance {tol:g} ({dtype})\n{format_table(rows)}",
            hint="the export does not reproduce the model: re-run with the same versions, and report it with this table",
        )
        err.rows = rows
        raise err
    return rows


def validate_component(module: torch.nn.Module, onnx_path: str | os.PathLike, spec: ComponentSpec,
                       shapes: list[dict[str, int]], dtype: str = "fp32", tolerance: float | None = None,
                       adapter=None) -> list[dict]:
    """Compare `onnx_path` (onnxruntime CPU) with `module` (torch) at each of `shapes`; rows of errors.
    Raises ValidationError naming component, output and error when above the tolerance."""
    return compare_onnx(onnx_path, spec, torch_reference(module, spec, shapes, dtype, adapter), dtype, tolerance)


def _compare(component: str, sizes: dict, output: str, expected: np.ndarray, actual: np.ndarray, tol: float,
             dtype: str) -> dict:
    row = {"component": component, "shape": dict(sizes), "output": output, "dtype": dtype, "tolerance": tol,
           "max_abs": float("inf"), "max_rel": float("inf"), "ok": False, "note": ""}
    if expected.shape != actual.shape:
        row["note"] = f"shape {list(actual.shape)} != torch {list(expected.shape)}"
        return row
    exp, act = expected.astype(np.float64), actual.astype(np.float64)
    if not np.isfinite(act).all() and np.isfinite(exp).all():
        row["note"] = "non-finite values"
        return row
    diff = np.abs(act - exp)
    scale = float(np.abs(exp).max()) if exp.size else 0.0
    row["max_abs"] = float(diff.max()) if diff.size else 0.0
    row["max_rel"] = row["max_abs"] / scale if scale > 0 else row["max_abs"]
    row["ok"] = bool(row["max_rel"] <= tol)
    return row


def format_table(rows: list[dict]) -> str:
    """The validation table as printed by `osx export`."""
    header = ("component", "shape", "output", "max abs", "max rel", "tol", "")
    body = [(r["component"], _sizes(r["shape"]), r["output"], f"{r['max_abs']:.2e}", f"{r['max_rel']:.2e}",
             f"{r['tolerance']:g}", "ok" if r["ok"] else f"FAIL {r['note']}".strip()) for r in rows]
    widths = [max(len(str(x[i])) for x in (header, *body)) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in (header, *body))


def _sizes(sizes: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())
