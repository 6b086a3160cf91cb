"""Quantize a component, gate it, and when the gate fails search for the layers to keep in full precision.

Sensitivity search: each layer (quantize.layer_groups) is quantized alone and its output error on the
held-out inputs measured; then the most sensitive layers are kept in full precision one at a time,
re-quantizing and re-gating after each, until the gate passes or no layer is left to exclude. Every
excluded layer is recorded with its measured error and the gate result that made it necessary.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from osx.calibration import gate as gate_mod
from osx.calibration.calibset import CalibrationSet
from osx.calibration.quantize import OP_TYPES, layer_groups, quantize
from osx.calibration.shards import ShardReader

QUANTIZABLE = ("text_encoder", "denoiser")  # the VAE decoder stays in full precision

# Called with the quantized graph of the component being searched; returns video_metrics of the
# decoded video against full precision (or None to skip the end-to-end part of the gate).
VideoCheck = Callable[[Path], "dict | None"]


def quantize_component(component: str, src: Path, dst: Path, precision: str, calib: CalibrationSet,
                       thresholds: gate_mod.Thresholds, *, video_check: VideoCheck | None = None,
                       search: bool = True, heldout_limit: int | None = None,
                       say: Callable[[str], None] = lambda m: None) -> tuple[gate_mod.GateResult, dict]:
    """Quantize `src` to `dst`; returns the final gate result and the component's report entry."""
    calib_files = calib.shards("calibration", component)
    heldout = calib.shards("heldout", component)
    with tempfile.TemporaryDirectory(prefix=f"osx-{component}-quant-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "ranges.json" if precision == "int8" else None  # calibrate once, reuse in the search

        def attempt(exclude: list[str]):
            start = time.perf_counter()
            result = quantize(src, dst, precision, calib_files, exclude=exclude, cache=cache)
            m = gate_mod.compare_component(component, src, dst, ShardReader(heldout), heldout_limit)
            video = video_check(dst) if video_check else None
            g = gate_mod.judge({component: m}, video, thresholds)
            row = {"excluded_layers": len(excluded), "passed": g.passed, "failures": g.failures,
                   "min_cosine": m["min_cosine"], "max_rel_l2": m["max_rel_l2"],
                   "psnr_min": video["psnr_min"] if video else None, "seconds": round(time.perf_counter() - start, 2)}
            return result, m, video, g, row

        excluded: dict[str, dict] = {}
        say(f"quantizing {component} to {precision}")
        result, m, video, g, row = attempt([])
        attempts, sensitivity = [row], {}
        if not g.passed and search:
            say(f"{component}: gate failed ({g.summary()}); measuring per-layer sensitivity")
            groups = layer_groups(src, OP_TYPES)
            sensitivity = measure_sensitivity(component, src, precision, calib_files, heldout, groups, cache, tmp,
                                              heldout_limit)
            ranked = sorted((l for l in groups if sensitivity[l]["quantized_ops"]),
                            key=lambda l: sensitivity[l]["rel_l2"], reverse=True)
            for layer in ranked:
                excluded[layer] = {
                    "layer": layer, "nodes": groups[layer],
                    "reason": f"quantized alone: cosine {sensitivity[layer]['cosine']:.5f}, relative L2 "
                              f"{sensitivity[layer]['rel_l2']:.4f} (rank {len(excluded) + 1} of {len(ranked)}); "
                              f"gate before excluding it: {g.summary()}",
                }
                say(f"{component}: keeping {layer} in full precision")
                nodes = [n for e in excluded.values() for n in e["nodes"]]
                result, m, video, g, row = attempt(nodes)
                attempts.append(row)
                if g.passed:
                    break
    entry = {
        "precision": precision,
        "quantizer": "onnxruntime quantize_static (QDQ, symmetric, per-channel weights)" if precision == "int8"
        else "NVIDIA ModelOpt ONNX PTQ (FP8 E4M3, max calibration)",
        "op_types": list(OP_TYPES),
        "qdq": result.qdq,
        "excluded": list(excluded.values()),
        "sensitivity": [{"layer": l, **s} for l, s in sensitivity.items()],
        "attempts": attempts,
        "gate": m,
        "passed": g.passed,
        "failures": g.failures,
    }
    if video is not None:
        entry["video"] = video
    return g, entry


def measure_sensitivity(component: str, src: Path, precision: str, calib_files: list[Path], heldout: list[Path],
                        groups: dict[str, list[str]], cache: Path | None, tmp: Path,
                        heldout_limit: int | None) -> dict[str, dict]:
    """Output error on the held-out inputs with only one layer quantized, for each layer."""
    out = {}
    probe = tmp / "probe.onnx"
    for layer, nodes in groups.items():
        r = quantize(src, probe, precision, calib_files, only=nodes, cache=cache)
        m = gate_mod.compare_component(component, src, probe, ShardReader(heldout), heldout_limit)
        out[layer] = {"cosine": m["min_cosine"], "rel_l2": m["max_rel_l2"], "quantized_ops": sum(r.qdq["quantized_ops"].values())}
    return out
