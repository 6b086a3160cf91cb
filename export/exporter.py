"""`osx export`: a checkpoint (or seeded random weights) -> a validated bundle.

    per component: checkpoint (or seeded random weights written as one) -> streamed ONNX export
    -> weights check, validation -> tokenizer, null caption -> manifest

The plan (osx.profiles) decides each component's backend, precision and shape ranges; `--gpu cpu` is
onnxruntime at fp32 over the model's full ranges. The ONNX graphs are always exported over the
model's full ranges (so `osx build` can re-plan them for another GPU); the manifest's `io` carries
the ranges this bundle was planned for, and validation runs inside those.

Everything is written by BundleWriter into a temporary folder beside `out` and renamed into place
only when the manifest is complete: a failed or interrupted export leaves nothing behind.

Memory (README "Exporting a real checkpoint"): components are exported one after another, each traced
on the meta device with its weights streamed from the memory-mapped checkpoint (osx.export.stream), so
the export itself holds about one tensor at a time. Validation builds the component in PyTorch (cut in
depth when large, see `validate_streamed`) and drops it before onnxruntime loads the graph. A large
component runs in a process of its own (osx.export.component_process), so what its validation leaves
resident is returned to the OS before the next component starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from osx import __version__
from osx.bundle import BundleWriter
from osx.components import DimRange
from osx.errors import CheckpointError, OsxError
from osx.export.checkpoint import CheckpointReader
from osx.export.component_process import in_child_process, release_memory
from osx.export.onnx_export import DTYPES
from osx.export.ort_optimize import add_onnxruntime_graph
from osx.export.request import ExportRequest
from osx.export.validate import (
    compare_onnx, format_table, fp16_noise, fp16_tolerance, torch_reference, validation_shapes,
)
from osx.manifest import ComponentEntry, Manifest, RuntimeSettings
from osx.families import component_specs, family_of, get_model_config, resolve
from osx.models import ModelConfig
from osx.runtime.tokenizer import check_vocabulary
from osx.numeric import format_bytes

TOKENIZER_FILE = "tokenizer.json"
NULL_TEXT_FILE = "null_text.npy"


def export_bundle(request: ExportRequest) -> Manifest:
    """Run `request` (osx.export.request.ExportRequest): returns the committed bundle's manifest.

    Components: those of the plan (text_encoder, denoiser, vae_decoder for the shipped profiles), plus
    `request.with_components` the pipeline does not run (vae_encoder: image-to-video, video extension; None:
    where the family declares references, planned and validated as the decoder is). `request.quantize`
    (osx.calibration.apply.QuantizeStep, from the command layer) turns int8/fp8-planned components into
    calibrated Q/DQ graphs; without it such a plan is refused."""
    start = time.perf_counter()

    def say(msg: str) -> None:
        request.progress(f"[{time.perf_counter() - start:6.1f}s] {msg}")

    model_cfg = get_model_config(request.model)
    family = family_of(model_cfg)
    model_cfg = with_reference_dtype(model_cfg, request.reference_dtype)
    asked = parse_dtypes(request.dtype)
    parts = request.weights.resolve(family)
    on_request = [c.name for c in family.components if not c.in_pipeline]
    if request.with_components is None:  # the VAE encoder where the family takes references (image-to-video, extension)
        default = [c.name for c in family.components if not c.in_pipeline and not c.optional_set]
        request = dataclasses.replace(request, with_components=tuple(default) if family.references else ())
    # an optional set (--with-t2i: t2i2v's Flux.1-dev and its decoder), planned by the family planner's with_SET option
    unknown = [s for s in request.with_sets if s not in family.optional_sets]
    if unknown:
        raise OsxError(f"--with-{unknown[0]}: {model_cfg.name} has no {unknown[0]} components",
                       hint=f"drop --with-{unknown[0]}" + (f"; {model_cfg.name} has --with-{', --with-'.join(family.optional_sets)}"
                                                          if family.optional_sets else ""))
    extra = tuple(n for s in request.with_sets for n in family.optional_set(s))
    request = dataclasses.replace(request, with_components=(*request.with_components, *extra))
    _check_optional_weights(family, extra, parts)
    plan = _plan(request.gpu, model_cfg, request.precision, **{f"with_{s}": True for s in request.with_sets})
    # the plan records what the bundle holds (the planner plans the VAE encoder where the family takes references)
    plan.components = {n: c for n, c in plan.components.items() if n not in on_request or n in request.with_components}
    precisions = {n: c.precision for n, c in plan.components.items()}
    if request.quantize is not None:
        request.quantize.check(precisions, model_cfg.name, model_cfg.random_init_seed, parts)
    elif any(c.needs_calibration for c in plan.components.values()):
        raise OsxError(f"{', '.join(n for n, c in plan.components.items() if c.needs_calibration)} planned at int8/fp8 "
                       "needs calibrated graphs", hint="export with `osx export --calibration DIR` (from `osx calibrate`)")
    names = _component_names(request, family, plan)
    dtypes = component_dtypes(asked, names, plan)
    with BundleWriter(request.out, force=request.force) as writer, _scratch_folder(request.out) as scratch:
        peaks: dict[str, int] = {}  # the components' own processes' peak resident sets
        components = _export_components(request, model_cfg, names, asked, dtypes, plan, parts, writer.dir, scratch, say, peaks)
        manifest = _manifest(model_cfg, components, plan, parts, writer.dir, say)
        if request.quantize is not None:  # before engines: TensorRT builds from the Q/DQ graphs
            manifest = request.quantize.apply(writer.dir, manifest, precisions, say)
        if any(c.backend == "tensorrt" for c in plan.components.values()):
            from osx.export.engines import build_engines

            say(f"building TensorRT engines for {plan.profile.name}")
            built = build_engines(writer.dir, manifest.components, plan, portable=request.portable)
            manifest = manifest.replace(components={n: c.with_engine(built[n]) if n in built else c
                                                    for n, c in manifest.components.items()})
        manifest = writer.commit(manifest.replace(build=versions(), export={
            "weights": {"random_seed": model_cfg.random_init_seed} if parts is None
            else {k: str(v) for k, v in parts.items()},
            "dtype": request.dtype, "precision": request.precision, "opset": request.opset, "gpu": request.gpu,
            "seconds": round(time.perf_counter() - start, 1),
            **({"process_peak_rss_bytes": peaks} if peaks else {}),
        }))
    say(f"wrote {request.out} ({format_bytes(sum(f.bytes for f in manifest.files.values()))}, {len(manifest.files)} files)")
    return manifest


def with_reference_dtype(model_cfg, reference_dtype: str | None):
    """`model_cfg` with the dtype its reference rounds t, fps, height, width and the schedule's sizes to
    (recorded in the manifest's scheduler settings; the traced denoiser, the torch reference and the
    runtime's NumPy scheduler all follow it). None: the config's own (its family's declared default)."""
    if reference_dtype is None:
        return model_cfg
    scheduler = getattr(model_cfg, "scheduler", None)
    if not hasattr(scheduler, "reference_dtype"):
        raise OsxError(f"--reference-dtype is not a setting of {model_cfg.family}", hint="drop --reference-dtype")
    # the config field holding the sampler settings (v1.2: `scheduler`; v2.0: `sampler`, `scheduler` its alias)
    field = next(f.name for f in dataclasses.fields(model_cfg) if getattr(model_cfg, f.name) is scheduler)
    return dataclasses.replace(model_cfg, **{field: dataclasses.replace(scheduler, reference_dtype=reference_dtype)})


def _check_optional_weights(family, names, parts: dict | None) -> None:
    """Optional parts (Flux.1-dev for --with-t2i) are not required by the checkpoint folder, so a component
    asked for whose part was not found is refused here, before anything is exported."""
    if parts is None:
        return
    missing = {family.component(n).weights for n in names} - set(parts)
    if missing:
        sources = [family.weight_source(p) for p in sorted(missing)]
        asked = [n for n in names if family.component(n).weights in missing]
        raise CheckpointError(f"{', '.join(asked)} need {', '.join(s.description for s in sources)}, which the checkpoint lacks",
                              hint="put " + ", ".join(f"{s.released_name}" for s in sources) + " in the checkpoint folder, or pass "
                              + ", ".join(f"{s.option} PATH" for s in sources)
                              + f"; or export without --with-{'/--with-'.join(family.optional_sets)}")


def _component_names(request: ExportRequest, family, plan) -> list[str]:
    """The components to export, in the family's order: the plan's, `with_components`, cut to `only`."""
    extra = [n for n in request.with_components if n not in family.names()]
    if extra:
        raise OsxError(f"{family.name} has no component {', '.join(extra)}", hint=f"it has {', '.join(family.names())}")
    names = [c.name for c in family.components if c.name in plan.components or c.name in request.with_components]
    unknown = [n for n in request.only if n not in names]
    if unknown:
        raise OsxError(f"--component {', '.join(unknown)} is not exported for this plan",
                       hint=f"choose from {', '.join(names)} (vae_encoder needs --with-vae-encoder, t2i_* --with-t2i)")
    return [n for n in names if n in request.only] if request.only else names


def _export_components(request, model_cfg, names, asked, dtypes, plan, parts, out_dir: Path, scratch: Path, say,
                       peaks: dict[str, int]) -> dict[str, ComponentEntry]:
    """Each component exported and validated, one at a time (`asked`: parse_dtypes, `dtypes`: component_dtypes);
    only the checkpoint parts these need are read. `peaks` gets the peak resident set of each component
    exported in a process of its own."""
    from osx.export.init import write_random_part

    family = family_of(model_cfg)
    glue = export_parts(family)
    specs = component_specs(model_cfg)
    components: dict[str, ComponentEntry] = {}
    readers: dict[str, CheckpointReader] = {}
    for i, name in enumerate(names):
        part = _part(model_cfg, name)
        if part not in readers:
            if parts is None:
                say(f"{name}: writing seeded random weights of the {part} to a scratch checkpoint "
                    f"({dtypes[name]}, one tensor at a time)")
                path = write_random_part(glue.part_factories(model_cfg)[part], scratch / f"{part}.safetensors",
                                         DTYPES[dtypes[name]][1], model_cfg.random_init_seed, glue.random_init_std(model_cfg)[part])
            else:
                path = parts[part]
            readers[part] = CheckpointReader(path)
        cplan = plan.components.get(name)
        io = specs[name].with_dims(**span(cplan.profiles)) if cplan else specs[name]
        # a graph fused for onnxruntime where onnxruntime runs it at fp32 (int8/fp8 are quantized from the portable one)
        runs_as = (cplan.backend, cplan.precision) if cplan else ("onnxruntime", dtypes[name])
        work = dict(name=name, model_cfg=model_cfg, checkpoint=readers[part].source, io=io, dtype=dtypes[name],
                    out_dir=out_dir, scratch=scratch, opset=request.opset, external_data_threshold=request.external_data_threshold,
                    fuse=family.component(name).ort_fusions and dtypes[name] == "fp32" and runs_as == ("onnxruntime", "fp32"))
        tell = lambda m, n=name: say(f"{n}: {m}")  # noqa: E731
        if _own_process(request, readers[part]):
            tell("exporting in a process of its own (its memory is returned when it ends)")
            entry = in_child_process(export_and_validate, work, say=tell, show=request.progress, what=name)
            peaks[name] = entry.pop("peak_rss_bytes")
            tell(f"done; the component's process peaked at {format_bytes(peaks[name])} resident")
        else:
            entry = export_and_validate(**work, say=tell, show=request.progress)
        components[name] = ComponentEntry.parse({
            **entry,
            "backend": cplan.backend if cplan else "onnxruntime",
            "plan_precision": cplan.precision if cplan else dtypes[name],
            "shape_ranges": [{d: dataclasses.asdict(r) for d, r in p.items()} for p in cplan.profiles] if cplan else [],
            "notes": _dtype_notes(family.component(name), wanted_dtype(asked.get(name, asked[""]), cplan), dtypes[name])
            + entry["notes"],
        }, name)
        if all(_part(model_cfg, n) != part for n in names[i + 1:]):  # last use of this part's checkpoint
            del readers[part]
            (scratch / f"{part}.safetensors").unlink(missing_ok=True)
    return components


def _manifest(model_cfg, components, plan, parts, out_dir: Path, say) -> Manifest:
    """The tokenizers written beside the graphs, and the manifest (before quantization, engines, commit)."""
    tokenizers = write_tokenizers(model_cfg, parts, out_dir, say)  # after the weights: their errors come first
    return Manifest(
        model={"name": model_cfg.name, "family": model_cfg.family, "config": model_cfg.to_dict()},
        components=components,
        tokenizer=tokenizers,
        scheduler=dataclasses.asdict(model_cfg.scheduler),
        runtime=RuntimeSettings(load_one_at_a_time=plan.load_one_at_a_time, cfg_batching=plan.cfg_batching),
        plan=plan.to_dict(),
    )


# --- one component ----------------------------------------------------------------------------------
# Export streams the weights (osx.export.stream). Validation runs the component in PyTorch and onnxruntime
# at full depth when its float32 weights fit in VALIDATION_BYTES; a deeper model is validated at full
# width with its first blocks (the ComponentDecl.depth config fields), exported by the same streamed path from the
# same checkpoint, and its full-depth graph is checked structurally (checker, shape inference, every
# initializer's dtype, shape and sha256 against its checkpoint tensor). onnxruntime's CPU provider does
# not run bfloat16 graphs: a bf16 component is validated as the same export in float32, and the bf16
# graph (this file, or the same cut exported in bf16) is shown to be that graph with cast weights
# (osx.export.structure: same nodes, attributes and edges once float Casts are bypassed; manifest
# validation.structure).

VALIDATION_BYTES = 2**30
OWN_PROCESS_BYTES = 2**27  # checkpoint parts above this are exported in a process of their own (_own_process)


def parse_dtypes(dtype: str) -> dict[str, str]:
    """--dtype: `D` for every component, or per component, `denoiser=fp16,text_encoder=bf16` (a bare `D`
    among them is the rest's; `plan` where none). D is fp32, fp16, bf16 or plan. {component or "": D}."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in dtype.split(",")):
        name, _, value = item.rpartition("=")
        if value not in (*DTYPES, "plan") or name in out:
            raise OsxError(f"--dtype {dtype!r}: {'repeats ' + (name or 'the default') if name in out else f'{value!r} is not a dtype'}",
                           hint=f"use one of {', '.join(DTYPES)}, plan, or per component: denoiser=fp16,text_encoder=bf16")
        out[name] = value
    out.setdefault("", "plan")
    return out


def component_dtypes(asked: dict[str, str], names: list[str], plan) -> dict[str, str]:
    """Each exported component's float type from parse_dtypes' {component or "": D} (see component_dtype)."""
    unknown = [n for n in asked if n and n not in names]
    if unknown:
        raise OsxError(f"--dtype names {', '.join(unknown)}, which this export does not write",
                       hint=f"components: {', '.join(names)}")
    family = family_of(plan.model)
    return {n: component_dtype(family.component(n), asked.get(n, asked[""]), plan.components.get(n)) for n in names}


def component_dtype(decl, dtype: str, cplan) -> str:
    """The float type a component (its osx.families.ComponentDecl) is exported in: `wanted_dtype`, but fp32
    instead of fp16 where its family never runs it in fp16, and instead of bf16 where its graph cannot be
    bf16 (ONNX Conv takes bfloat16 only from opset 22; osx exports at 18-20, what onnxruntime and TensorRT
    10 parse)."""
    dtype = wanted_dtype(dtype, cplan)
    return "fp32" if (dtype == "fp16" and decl.never_fp16) or (dtype == "bf16" and decl.no_bf16) else dtype


def wanted_dtype(dtype: str, cplan) -> str:
    """--dtype, or with `plan` the plan's precision: its float type; under an int8/fp8 plan the float graph
    the Q/DQ one is made from, fp16 for TensorRT (strongly typed: fp16 outside the Q/DQ pairs) and fp32
    for onnxruntime on the CPU (its INT8 quantizer and kernels are fp32)."""
    if dtype != "plan":
        return dtype
    if cplan is None or cplan.precision in DTYPES:
        return cplan.precision if cplan else "fp32"
    return "fp16" if cplan.backend == "tensorrt" else "fp32"


def export_and_validate(name, model_cfg, checkpoint, io, dtype, out_dir: Path, scratch: Path, *, opset, external_data_threshold,
                        fuse: bool, say, show) -> dict:
    """One component's manifest entry: `export_one` from the checkpoint at `checkpoint`, and with `fuse` the
    graph fused for onnxruntime beside it. What runs in the component's own process (osx.export.component_process)."""
    entry = export_one(name, model_cfg, CheckpointReader(checkpoint), io, dtype, out_dir, scratch, opset=opset,
                       external_data_threshold=external_data_threshold, say=say, progress=show)
    if fuse:
        say("fusing for onnxruntime (GELU, RMSNorm, LayerNorm), checking the fused graph")
        entry.update(add_onnxruntime_graph(out_dir, name, entry["file"], io.with_precision("float32"),
                                           entry["validation"]["tolerance"]))
    return entry


def _own_process(request: ExportRequest, reader: CheckpointReader) -> bool:
    """Whether a component runs in a process of its own: `request.own_process`, or where it is None (auto)
    when its checkpoint part holds over OWN_PROCESS_BYTES (starting a process costs seconds of imports)."""
    if request.own_process is not None:
        return request.own_process
    return sum(math.prod(reader.shape(k)) * reader.dtype(k).itemsize for k in reader.keys()) > OWN_PROCESS_BYTES


def export_one(name, model_cfg, reader, io, dtype, out_dir: Path, scratch: Path, *, opset, external_data_threshold,
               say, progress) -> dict:
    """Export component `name` streamed from `reader`, validate it, and return its manifest entry."""
    from osx.export.onnx_export import export_streamed

    spec = component_specs(model_cfg)[name]
    info = export_streamed(_weights(model_cfg, name, reader), spec, out_dir / f"{name}.onnx", dtype=dtype,
                           opset=opset, external_data_threshold=external_data_threshold, progress=say,
                           adapter=_adapter(model_cfg), repeat=repeat_for(model_cfg, name))
    say(f"weights: {info.weights_check['from_checkpoint_sha256_ok']} initializers match their checkpoint tensors (sha256)")
    io = io.with_precision(DTYPES[dtype][0])
    validation, extra = validate_streamed(name, model_cfg, reader, io, dtype, out_dir / info.file, scratch,
                                          opset=opset, say=say)
    progress(format_table(validation["rows"]))
    if "null_text" in extra:  # the denoiser's learned null caption
        np.save(out_dir / NULL_TEXT_FILE, extra.pop("null_text"))
        extra["null_text_file"] = NULL_TEXT_FILE
    return {
        "file": info.file,
        **({"data_file": info.data_file} if info.data_file else {}),
        "precision": dtype,
        "io": io.to_dict(),
        "onnx_dims": {d: dataclasses.asdict(r) for d, r in spec.dims.items()},
        "validation": validation,
        "weights_check": info.weights_check,
        "op_counts": info.op_counts,
        "nodes": info.nodes,
        "opset": info.opset,
        "exporter": info.exporter,
        "cleanup": info.cleanup,
        "export_seconds": info.seconds,
        "notes": info.notes,
        **extra,
    }


def validate_streamed(name, model_cfg, reader, io, dtype, graph: Path, scratch: Path, *, opset, say):
    """onnxruntime vs PyTorch at `validation_shapes(io)` (see the section comment for which graph and
    depth). Returns the manifest's validation entry and extras (the denoiser's null caption)."""
    from osx.export.onnx_export import export_streamed
    from osx.export.structure import compare_cast_graphs

    cfg, depth = validation_config(name, model_cfg, reader)
    val_dtype = "fp32" if dtype == "bf16" else dtype
    what = {"graph": "this file"}

    def cut(dtype: str) -> Path:  # the validation depth's graph, exported by the same streamed path
        return scratch / export_streamed(_weights(cfg, name, reader, unused_ok=True), component_specs(cfg)[name],
                                         scratch / f"{name}.validate.{dtype}.onnx", dtype=dtype, opset=opset,
                                         external_data_threshold=0, adapter=_adapter(cfg),  # read back in chunks
                                         repeat=repeat_for(cfg, name),
                                         check_weights=False).file  # its weights meet PyTorch's from the same checkpoint

    if cfg is not model_cfg or val_dtype != dtype:
        what = {"graph": f"the same checkpoint exported by the same path in {val_dtype}"
                         + (f" with its first {_blocks(depth)}" if depth else ""),
                "depth": depth, "dtype": val_dtype}
        say(f"validation graph: {what['graph']}")
        validated = cut(val_dtype)
        if val_dtype != dtype:  # onnxruntime runs no bf16: show the bf16 graph is the validated one, weights cast
            typed = cut(dtype) if depth else graph
            say(f"comparing the {dtype} graph{' (same cut)' if depth else ''} with the validated {val_dtype} one, node by node")
            what["structure"] = {"typed_graph": f"the same cut exported in {dtype}" if depth else "this file",
                                 **compare_cast_graphs(validated, typed)}
            _remove_graph(typed, scratch)
        graph = validated
    module = _weights(cfg, name, reader, unused_ok=True).materialize(torch.float32)
    extra = {"null_text": module.null_text(1)[0].float().numpy()} if hasattr(module, "null_text") else {}
    io = io.with_precision(DTYPES[val_dtype][0])
    shapes = validation_shapes(io)
    say(f"validating against PyTorch at {len(shapes)} shapes (onnxruntime CPU)")
    # fp16: PyTorch's fp32 outputs too, to measure how far fp16 itself moves them (osx.export.validate).
    fp32_cases = torch_reference(module, io, shapes, "fp32", _adapter(cfg)) if val_dtype == "fp16" else None
    cases = torch_reference(module.to(DTYPES[val_dtype][1]), io, shapes, val_dtype, _adapter(cfg))
    del module
    release_memory()  # the torch weights go before onnxruntime loads the graph
    noise = {"torch_fp16_vs_fp32": fp16_noise(fp32_cases, cases)} if fp32_cases else {}
    tolerance = fp16_tolerance(noise["torch_fp16_vs_fp32"]) if fp32_cases else None
    rows = compare_onnx(graph, io, cases, val_dtype, tolerance)
    _remove_graph(graph, scratch)
    return {"tolerance": rows[0]["tolerance"], **noise, **what, "rows": rows}, extra


def _remove_graph(graph: Path, scratch: Path) -> None:
    if graph.parent == scratch:
        for p in (graph, Path(f"{graph}.data")):
            p.unlink(missing_ok=True)


def validation_config(name: str, model_cfg: ModelConfig, reader) -> tuple[ModelConfig, list | dict | None]:
    """The model config to validate `name` at: the model's own when the part's float32 weights fit in
    VALIDATION_BYTES, else the same with every block count the family declares for it (ComponentDecl.depth, a
    possibly nested "section.field" path: Flux's "t2i.mmdit.depth") cut in proportion (at least one block each). Depth: [n, full] for one count, {field: [n, full]} for several."""
    total = sum(4 * math.prod(reader.shape(k)) for k in reader.keys())
    fields = family_of(model_cfg).component(name).depth
    if total <= VALIDATION_BYTES or not fields:
        return model_cfg, None
    cfg, depth = model_cfg, {}
    for path in fields:
        full = functools.reduce(getattr, path.split("."), cfg)
        n = max(1, min(full, full * VALIDATION_BYTES // total))
        cfg, depth[path] = _replace_path(cfg, path, n), [n, full]
    if all(n == full for n, full in depth.values()):
        return model_cfg, None
    return cfg, next(iter(depth.values())) if len(depth) == 1 else depth


def repeat_for(model_cfg: ModelConfig, name: str):
    """How to trace component `name` at a cost independent of its depth (osx.export.repeat.Repeat): the model
    cut to repeat.TRACED blocks of each kind its family declares (ComponentDecl.blocks) that has more; None if
    none has."""
    from osx.export.repeat import TRACED, Repeat
    from osx.export.stream import trainable_params_on_meta

    decl = family_of(model_cfg).component(name)
    kinds = [(path, prefixes, functools.reduce(getattr, path.split("."), model_cfg))
             for path, prefixes in zip(decl.depth, decl.blocks)]
    if not any(full > TRACED for _, _, full in kinds):
        return None
    cut = functools.reduce(lambda cfg, kind: _replace_path(cfg, kind[0], min(kind[2], TRACED)), kinds, model_cfg)
    with trainable_params_on_meta():
        module = export_parts(family_of(cut)).part_factories(cut)[decl.weights]()
    return Repeat(module.to("meta").eval().requires_grad_(False),
                  tuple((prefixes, full) for _, prefixes, full in kinds if full > TRACED))


def _replace_path(cfg, path: str, value):
    """`cfg` with the (nested) dataclass field at "a.b.c" set to `value`."""
    head, _, rest = path.partition(".")
    return dataclasses.replace(cfg, **{head: _replace_path(getattr(cfg, head), rest, value) if rest else value})


def _blocks(depth: list | dict) -> str:
    """"2 of 28 blocks", or per block kind: "1 of 19 (mmdit.depth), 1 of 38 (mmdit.depth_single_blocks) blocks"."""
    if isinstance(depth, list):
        return f"{depth[0]} of {depth[1]} blocks"
    return ", ".join(f"{n} of {full} ({path})" for path, (n, full) in depth.items()) + " blocks"


# --- what a family adds to its declaration for export (osx.families.Family.export_parts) ------------------


def export_parts(family):
    """The family's export module: part_factories, random_init_std, tokenizers."""
    return importlib.import_module(family.export_parts)


def _adapter(model_cfg):
    """The family's forward adapter (osx.export.onnx_export.SpecModule), None for the built-in one."""
    family = family_of(model_cfg)
    return resolve(family.forward_adapter) if family.forward_adapter else None


def _weights(model_cfg, name: str, reader, **kw):
    """Component `name`'s module on the meta device with its weights' sources in `reader` (osx.export.stream)."""
    from osx.export.stream import Weights

    family = family_of(model_cfg)
    part = family.component(name).weights
    return Weights(export_parts(family).part_factories(model_cfg)[part], reader,
                   unused_prefixes=family.weight_source(part).unused_prefixes, **kw)


def write_tokenizers(model_cfg, parts: dict | None, out_dir: Path, say) -> dict:
    """Each text encoder's tokenizer into the bundle (the family's PromptDecl: file, pad token), checked
    against the encoder's vocabulary; returns the manifest's `tokenizer` entry."""
    family = family_of(model_cfg)
    tokenizers = export_parts(family).tokenizers(model_cfg, parts)
    specs = component_specs(model_cfg)
    encoders = {}
    for decl in family.prompt.tokenizers:
        say(f"writing {decl.file} ({decl.encoder})")
        spec, tok = specs[decl.encoder], tokenizers[decl.encoder]
        source = family.weight_source(family.component(decl.encoder).weights)
        where = f"{decl.encoder} tokenizer" if parts is None else f"{parts[source.part]}/{source.folder_file}"
        check_vocabulary(tok.get_vocab_size(with_added_tokens=True), spec.vocab_size, where, error=CheckpointError)
        tok.save(str(out_dir / decl.file))
        encoders[decl.encoder] = {"file": decl.file, "max_length": spec.inputs[0].shape[1], "pad_token": decl.pad_token}
    first = encoders[family.prompt.tokenizers[0].encoder]
    return {"file": first["file"], "max_length": first["max_length"], **({"encoders": encoders} if len(encoders) > 1 else {})}


def _part(model_cfg, name: str) -> str:
    """The checkpoint part (the family's weight source) component `name` is read from."""
    return family_of(model_cfg).component(name).weights


def _dtype_notes(decl, wanted: str, used: str) -> list[str]:
    if used == "fp32" and wanted == "fp16":
        return [f"{decl.never_fp16}: exported in float32"]
    if used == "fp32" and wanted == "bf16":
        return [f"{decl.no_bf16}: ONNX Conv has no bfloat16 before opset 22, exported in float32"]
    return [f"bfloat16: validated as the same export in float32 (onnxruntime's CPU provider runs no bfloat16), which "
            "the bf16 graph matches node by node with every weight cast (validation.structure)"] if used == "bf16" else []


@contextlib.contextmanager
def _scratch_folder(out: Path):
    """A hidden folder beside --out for random-weight checkpoints and validation graphs, always removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def span(profiles: list[dict[str, DimRange]]) -> dict[str, DimRange]:
    """One range covering every optimisation profile of a component (opt: the first profile's)."""
    dims = {}
    for d in profiles[0]:
        lo, hi = min(p[d].min for p in profiles), max(p[d].max for p in profiles)
        dims[d] = DimRange(lo, min(max(profiles[0][d].opt, lo), hi), hi)
    return dims


def _plan(gpu: str, model_cfg: ModelConfig, precision: str, **options):
    """`options`: the family planner's (with_t2i)."""
    from osx.profiles import detect_profile, load_profile, plan_that_fits
    from osx.profiles.planner import machine_ram_bytes

    profile = detect_profile()[0] if gpu == "auto" else load_profile(gpu)
    return plan_that_fits(profile, model_cfg, precision, machine_ram_bytes() if gpu == "auto" else None, **options)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import onnxslim
    import torch

    return {"osx": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "onnxslim": onnxslim.__version__, "python": sys.version.split()[0], "platform": platform.platform()}
