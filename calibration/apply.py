"""Quantize a component, gate it, and when the gate fails search for the layers to keep in full precision.

Sensitivity search: each layer (quantize.layer_groups) is quantized alone and its output error on the
held-out inputs measured; then the most sensitive layers are kept in full precision one at a time,
re-quantizing and re-gating after each, until the gate passes or no layer is left to exclude. Every
excluded layer is recorded with its measured error and the gate result that made it necessary.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from osx.calibration import gate as gate_mod
from osx.calibration.calibset import CalibrationSet, weights_identity
from osx.calibration.quantize import OP_TYPES, Quantizer, choose_quantizer, layer_groups, outside_blocks, quantize, source_dtype
from osx.calibration.shards import ShardReader
from osx.export.ort_optimize import SUFFIX, optimize_for_onnxruntime
from osx.families import family_of, get_family, get_model_config
from osx.manifest import Manifest


OUTSIDE_BLOCKS = ("outside the repeated blocks: onnxruntime's static INT8 keeps it in full precision "
                  "(a small share of the work, the most sensitive to per-tensor ranges; quantize.outside_blocks)")

# Called with the quantized graph of the component being searched; returns video_metrics of the
# decoded video against full precision (or None to skip the end-to-end part of the gate).
VideoCheck = Callable[[Path], "dict | None"]


def quantize_component(component: str, src: Path, dst: Path, precision: str, calib: CalibrationSet,
                       thresholds: gate_mod.Thresholds, *, backend: str = "onnxruntime",
                       video_check: VideoCheck | None = None, search: bool = True, heldout_limit: int | None = None,
                       method: str = "static", keep: dict[str, str] | None = None, fuse: bool = True,
                       blocks_only: bool = False,
                       say: Callable[[str], None] = lambda m: None) -> tuple[gate_mod.GateResult, dict]:
    """Quantize `src` to `dst` for `backend` (which picks the quantizer; `method`: INT8 on onnxruntime,
    static or dynamic); returns the final gate result and the component's report entry. `keep`: layers kept
    in full precision from the start, with why (the family's ComponentDecl.full_precision). `fuse`: onnxruntime's
    transformer fusions apply to this graph (ComponentDecl.ort_fusions). `blocks_only`: onnxruntime's static INT8
    keeps the layers outside the repeated blocks in full precision (ComponentDecl.static_int8_blocks_only)."""
    calib_files = calib.shards("calibration", component)
    heldout = calib.shards("heldout", component)
    quantizer = choose_quantizer(precision, component, backend, source_dtype(src), method)
    with tempfile.TemporaryDirectory(prefix=f"osx-{component}-quant-") as tmp:
        tmp = Path(tmp)
        # onnxruntime static: calibrate once, reuse the ranges in the search
        cache = tmp / "ranges.json" if quantizer.tool == "onnxruntime" and quantizer.method == "static" else None
        # onnxruntime runs the Q/DQ graph fused like the fp32 one (osx.export.ort_optimize), so that is the
        # graph the gate judges; the unfused Q/DQ graph stays the portable one (TensorRT, `osx build`).
        fused = dst.with_name(dst.name.removesuffix(".onnx") + SUFFIX) if quantizer.tool == "onnxruntime" and fuse else None
        fusion = {}

        def attempt(exclude: list[str]):
            start = time.perf_counter()
            result = quantize(src, dst, precision, calib_files, exclude=exclude, cache=cache, quantizer=quantizer)
            if fused is not None:
                fusion.update(optimize_for_onnxruntime(dst, fused))
            runs = fused or dst
            m = gate_mod.compare_component(component, src, runs, ShardReader(heldout), heldout_limit)
            video = video_check(runs) if video_check else None
            g = gate_mod.judge({component: m}, video, thresholds)
            row = {"excluded_layers": len(excluded), "passed": g.passed, "failures": g.failures,
                   "min_cosine": m["min_cosine"], "max_rel_l2": m["max_rel_l2"],
                   "psnr_min": video["psnr_min"] if video else None, "seconds": round(time.perf_counter() - start, 2)}
            return result, m, video, g, row

        groups = layer_groups(src, OP_TYPES)
        excluded = declared_exclusions(component, groups, keep or {})
        if blocks_only and cache is not None:  # onnxruntime static: the layers outside the blocks stay fp32
            excluded |= {l: {"layer": l, "nodes": nodes, "reason": OUTSIDE_BLOCKS}
                         for l, nodes in outside_blocks(src).items() if l not in excluded}
        kept = list(excluded)
        say(f"quantizing {component} to {precision}")
        result, m, video, g, row = attempt([n for e in excluded.values() for n in e["nodes"]])
        attempts, sensitivity = [row], {}
        if not g.passed and search:
            say(f"{component}: gate failed ({g.summary()}); measuring per-layer sensitivity")
            searched = {l: nodes for l, nodes in groups.items() if l not in kept}
            sensitivity = measure_sensitivity(component, src, precision, calib_files, heldout, searched, cache, tmp,
                                              heldout_limit, quantizer)
            ranked = sorted((l for l in searched if sensitivity[l]["quantized_ops"]),
                            key=lambda l: sensitivity[l]["rel_l2"], reverse=True)
            for rank, layer in enumerate(ranked, 1):
                excluded[layer] = {
                    "layer": layer, "nodes": groups[layer],
                    "reason": f"quantized alone: cosine {sensitivity[layer]['cosine']:.5f}, relative L2 "
                              f"{sensitivity[layer]['rel_l2']:.4f} (rank {rank} of {len(ranked)}); "
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
        "quantizer": quantizer.describe(precision),
        "op_types": list(OP_TYPES),
        "qdq": result.qdq,
        "excluded": list(excluded.values()),  # each with its reason: the family, the quantizer's policy, the search
        "sensitivity": [{"layer": l, **s} for l, s in sensitivity.items()],
        "attempts": attempts,
        "gate": m,
        "passed": g.passed,
        "failures": g.failures,
    }
    if video is not None:
        entry["video"] = video
    if fused is not None:
        entry["onnxruntime_graph"] = {"file": fused.name, **fusion}
    return g, entry


def declared_exclusions(component: str, groups: dict[str, list[str]], keep: dict[str, str]) -> dict[str, dict]:
    """The report entries of the layers a family keeps in full precision; an error for one the graph lacks
    (quantizing it silently would be worse)."""
    from osx.errors import OsxError

    missing = sorted(set(keep) - set(groups))
    if missing:
        raise OsxError(f"{component}: the layers to keep in full precision ({', '.join(missing)}) are not in its graph",
                       hint=f"its layers: {', '.join(sorted(groups))}; re-export the bundle with this osx")
    return {l: {"layer": l, "nodes": groups[l], "reason": f"kept by the model family: {why}"} for l, why in keep.items()}


def measure_sensitivity(component: str, src: Path, precision: str, calib_files: list[Path], heldout: list[Path],
                        groups: dict[str, list[str]], cache: Path | None, tmp: Path,
                        heldout_limit: int | None, quantizer: Quantizer) -> dict[str, dict]:
    """Output error on the held-out inputs with only one layer quantized, for each layer."""
    out = {}
    probe = tmp / "probe.onnx"
    for layer, nodes in groups.items():
        r = quantize(src, probe, precision, calib_files, only=nodes, cache=cache, quantizer=quantizer)
        m = gate_mod.compare_component(component, src, probe, ShardReader(heldout), heldout_limit)
        out[layer] = {"cosine": m["min_cosine"], "rel_l2": m["max_rel_l2"], "quantized_ops": sum(r.qdq["quantized_ops"].values())}
    return out


# --- a whole bundle -----------------------------------------------------------------------------------


def check_request(precisions: dict[str, str], calibration: str | Path | None, model_name: str, weights: str) -> None:
    """Before any export work: a calibration set that matches the model and weights exists where
    int8/fp8 is planned, ModelOpt is there for fp8, and --calibration is not given for nothing."""
    from osx.calibration.quantize import modelopt_python
    from osx.errors import OsxError

    wanted = _targets(precisions, family_of(get_model_config(model_name)).quantizable)
    if not wanted:
        if calibration is not None:
            raise OsxError(f"--calibration {calibration} was given, but no component is planned at int8 or fp8",
                           hint="pass --precision int8 (or fp8 on a GPU with compute capability >= 8.9), or drop --calibration")
        return
    what = ", ".join(f"{c} {p}" for c, p in wanted.items())
    if calibration is None:
        raise OsxError(f"{what} needs a calibration set",
                       hint=f"run `osx calibrate --model {model_name} ... --out calib/` with the same weights, "
                       "then pass --calibration calib/")
    CalibrationSet.open(calibration).check_model(model_name, weights)
    if "fp8" in wanted.values():
        modelopt_python()  # no ModelOpt: say how to install it now, not after the export

REPORT_DIR = "quantization"  # in the bundle: report.json, report.png, frames.png


@dataclass(frozen=True)
class QuantizeStep:
    """Where calibrated Q/DQ graphs join an export (the command layer hands it to the exporter):
    `check` runs before any export work; `apply` once every float graph, the tokenizer and the null
    caption are written (the quality gate generates videos with the bundle) and before engines are built."""

    calibration: str | Path | None = None
    thresholds: gate_mod.Thresholds = field(default_factory=gate_mod.Thresholds)
    allow_quality_loss: bool = False
    search: bool = True  # when the gate fails: keep the most sensitive layers in full precision until it passes
    int8_method: str = "static"  # INT8 on onnxruntime: "static" (calibrated Q/DQ) or "dynamic" (quantize.py)
    video_gate: bool = True  # also compare decoded videos (held-out prompts) full precision vs quantized

    def check(self, precisions: dict[str, str], model_name: str, random_seed: int, checkpoint: dict | None) -> None:
        if self.int8_method != "static" and "int8" not in precisions.values():
            from osx.errors import OsxError

            raise OsxError(f"--int8-method {self.int8_method} was given, but no component is planned at int8",
                           hint="pass --precision int8 (or a --gpu profile that plans int8), or drop --int8-method")
        check_request(precisions, self.calibration, model_name, weights_identity(random_seed, checkpoint))

    def apply(self, bundle_dir: Path, manifest: Manifest, precisions: dict[str, str], say: Callable[[str], None]) -> Manifest:
        if self.calibration is None:
            return manifest
        return quantize_bundle(bundle_dir, manifest, precisions, self, say)


def quantize_bundle(bundle_dir: Path, manifest: Manifest, precisions: dict[str, str], step: QuantizeStep,
                    say: Callable[[str], None] = lambda m: None) -> Manifest:
    """Quantize the bundle-in-progress at `bundle_dir` (its fp32/fp16 ONNX files and `manifest`, before
    BundleWriter.commit) in place as `step` says (its calibration set, gate thresholds, search): each
    component whose precision is int8/fp8 is replaced by its Q/DQ graph, the report goes to
    `quantization/`, and the manifest is updated and returned.

    The end-to-end gate generates each held-out prompt of the calibration set (its seed, resolution and
    frames) with this bundle on onnxruntime, full precision vs quantized, and compares the videos.
    Raises gate.QualityGateError when the gate fails, unless `step.allow_quality_loss`.
    """
    from osx.bundle import Bundle
    from osx.calibration.report import write_report

    family = get_family(manifest.model["family"])
    quantizable = family.quantizable
    targets = _targets({c: p for c, p in precisions.items() if c in manifest.components}, quantizable)
    if not targets:
        return manifest
    calib = CalibrationSet.open(step.calibration)
    calib.check_model(manifest.model["name"])
    thresholds, video_gate = step.thresholds, step.video_gate
    bundle_dir = Path(bundle_dir)
    # The gate runs the graphs on onnxruntime over the ranges they were exported with, so calibrating
    # below the sizes a GPU plan narrowed the bundle to still works.
    full_range = manifest.replace(components={c: replace(m, io=replace(m.io, dims=m.onnx_dims or m.io.dims))
                                              for c, m in manifest.components.items()})
    reference = Bundle(bundle_dir, full_range)
    recipe = calib.recipe
    held = recipe["heldout"]
    size = {"height": recipe["height"], "width": recipe["width"], "num_frames": recipe["num_frames"]}

    def generate(bundle) -> list:
        from osx.runtime.pipeline import Pipeline

        pipe = Pipeline.load(bundle, "onnxruntime")
        try:
            return [pipe.generate(p, seed=s, **size) for p, s in zip(held["prompts"], held["seeds"])]
        finally:
            pipe.release()

    ref_videos = generate(reference) if video_gate else None
    quantized: dict[str, Path] = {}  # the Q/DQ graphs
    running: dict[str, Path] = {}  # what onnxruntime runs of each (fused, where the quantizer is onnxruntime's)
    last_videos: list = []

    def video_check_for(component: str) -> VideoCheck | None:
        if not video_gate:
            return None

        def check(candidate: Path) -> dict:
            files = {**running, component: candidate}
            # the candidate runs, not a fused fp32 graph the entry may also name
            trial = full_range.replace(components={c: (replace(m, file=_rel(files[c], bundle_dir), onnxruntime_file=None)
                                                       if c in files else m)
                                                   for c, m in full_range.components.items()})
            videos = generate(Bundle(bundle_dir, trial))
            last_videos[:] = videos
            return gate_mod.video_summary(size, held["prompts"], videos, ref_videos)
        return check

    entries, final = {}, None
    for component in quantizable:  # in the family's order: the text encoder first: the denoiser's video gate then sees both quantized
        if component not in targets:
            continue
        src = bundle_dir / manifest.components[component].file
        dst = bundle_dir / f"{component}.{targets[component]}.onnx"
        backend = manifest.components[component].backend
        method = step.int8_method if targets[component] == "int8" else "static"
        decl = family.component(component)
        final, entries[component] = quantize_component(component, src, dst, targets[component], calib, thresholds,
                                                       backend=backend, video_check=video_check_for(component),
                                                       search=step.search, method=method,
                                                       keep=dict(decl.full_precision), fuse=decl.ort_fusions,
                                                       blocks_only=decl.static_int8_blocks_only, say=say)
        quantized[component] = dst
        fused = entries[component].get("onnxruntime_graph")
        running[component] = bundle_dir / fused["file"] if fused else dst

    video = entries[list(entries)[-1]].get("video")
    failures = [f for e in entries.values() for f in e["failures"]]
    report = {
        "precision": "/".join(sorted(set(targets.values()))),
        "reference_precision": "/".join(sorted({manifest.components[c].precision for c in targets})),
        "calibration": {"hash": calib.hash, "samples": {c: calib.count("calibration", c) for c in targets},
                        "heldout_prompts": held["prompts"], **size, "target": recipe["target"]},
        "thresholds": thresholds.to_dict(),
        "passed": not failures,
        "failures": failures,
        "allow_quality_loss": step.allow_quality_loss,
        "components": entries,
        "video": video,
    }
    files = write_report(bundle_dir / REPORT_DIR, report, ref_videos[0] if ref_videos else None,
                         last_videos[0] if last_videos else None)
    gate_mod.enforce(gate_mod.GateResult(not failures, failures), report["precision"], step.allow_quality_loss)

    components = dict(manifest.components)
    for component, dst in quantized.items():
        old = components[component]
        data = dst.with_name(dst.name + ".data")
        named = {k: v for k, v in old.files.items() if k != "data_file"}
        if data.exists():
            named["data_file"] = data.name
        # the fused fp32 graph (osx.export.ort_optimize) is not what runs any more; onnxruntime's quantizer
        # fused its own Q/DQ graph (quantize_component)
        fused = entries[component].get("onnxruntime_graph")
        kept = {k: v for k, v in old.report.items() if k != "onnxruntime_graph"}
        if fused:
            kept["onnxruntime_graph"] = fused
        # The floating-point graph stays (its external data too, beside it): `osx build` can re-plan the
        # bundle for a GPU without int8/fp8 (export.engines.onnx_source reads `onnx_files`).
        components[component] = replace(
            old, file=dst.name, precision=targets[component], calibration_hash=calib.hash, files=named,
            onnx_files={**old.onnx_files, old.precision: old.file}, onnxruntime_file=fused["file"] if fused else None,
            report={**kept, "quantization": {"quantizer": entries[component]["quantizer"],
                                               "excluded_layers": [e["layer"] for e in entries[component]["excluded"]],
                                               "report": f"{REPORT_DIR}/report.json"}})
    return manifest.replace(components=components, quantization={
        "calibration_hash": calib.hash, "passed": report["passed"], "files": [f"{REPORT_DIR}/{f}" for f in files]})


def _targets(precisions: dict[str, str], quantizable: tuple[str, ...]) -> dict[str, str]:
    """The components to quantize (int8/fp8); an error for one that cannot be."""
    from osx.errors import OsxError

    targets = {c: p for c, p in precisions.items() if p in ("int8", "fp8")}
    unsupported = sorted(c for c in targets if c not in quantizable)
    if unsupported:
        raise OsxError(f"cannot quantize {', '.join(unsupported)}", hint=f"quantizable components: {', '.join(quantizable)}")
    return targets


def _rel(path: Path, root: Path) -> str:
    import os

    return os.path.relpath(path, root)
