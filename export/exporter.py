"""`osx export`: a checkpoint (or seeded random weights) -> a validated bundle.

    reference model -> per component: ONNX export, validation -> tokenizer, null caption -> manifest

The plan (osx.profiles) decides each component's backend, precision and shape ranges; `--gpu cpu` is
onnxruntime at fp32 over the model's full ranges. The ONNX graphs are always exported over the
model's full ranges (so `osx build` can re-plan them for another GPU); the manifest's `io` carries
the ranges this bundle was planned for, and validation runs inside those.

Everything is written by BundleWriter into a temporary folder beside `out` and renamed into place
only when the manifest is complete: a failed or interrupted export leaves nothing behind.

Memory (README "Exporting a real checkpoint"): components are exported one after another and each
torch module is dropped (after its reference outputs are computed) before onnxruntime loads its graph,
so one copy of a component's weights is alive at a time during validation.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from osx import __version__
from osx.bundle import EXTERNAL_DATA_BYTES, BundleWriter
from osx.components import COMPONENTS, NEVER_FP16, DimRange, component_specs
from osx.errors import CheckpointError, OsxError
from osx.export.onnx_export import DTYPES, OPSETS, export_component
from osx.export.validate import (
    compare_onnx, format_table, fp16_noise, fp16_tolerance, torch_reference, validation_shapes,
)
from osx.models import ModelConfig, get_model_config
from osx.numeric import format_bytes

# The torch module each component comes from (the VAE serves both chunk graphs).
SOURCE = {"text_encoder": "text_encoder", "denoiser": "denoiser", "vae_decoder": "vae", "vae_encoder": "vae"}
TOKENIZER_FILE = "tokenizer.json"
NULL_TEXT_FILE = "null_text.npy"
CHECKPOINT_PARTS = ("denoiser", "vae", "t5")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def export_bundle(
    model_name: str,
    out: str | os.PathLike,
    *,
    gpu: str = "cpu",
    checkpoint: str | os.PathLike | None = None,
    t5: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    denoiser: str | os.PathLike | None = None,
    random_weights: bool = False,
    dtype: str = "fp32",
    precision: str = "auto",
    quantize=None,
    force: bool = False,
    opset: int = 18,
    portable: bool = False,
    with_vae_encoder: bool = False,
    external_data_threshold: int = EXTERNAL_DATA_BYTES,
    progress: Callable[[str], None] = print,
) -> dict:
    """Export `model_name` to a bundle at `out`; returns the manifest. See `osx export --help`.

    Components: those of the plan (text_encoder, denoiser, vae_decoder for the shipped profiles), plus
    vae_encoder with `with_vae_encoder` (image-to-video; text-to-video does not use it). `quantize`
    (osx.calibration.apply.QuantizeStep, from the command layer) turns int8/fp8-planned components into
    calibrated Q/DQ graphs; without it such a plan is refused."""
    start = time.perf_counter()

    def say(msg: str) -> None:
        progress(f"[{time.perf_counter() - start:6.1f}s] {msg}")

    model_cfg = get_model_config(model_name)
    if dtype not in DTYPES:
        raise OsxError(f"unknown --dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    if opset not in OPSETS:
        raise OsxError(f"--opset {opset} is not supported", hint=f"use one of {', '.join(map(str, OPSETS))} "
                       "(onnxruntime and TensorRT 10 parse these; from 23 on, attention becomes an op onnxruntime rejects)")
    parts = resolve_checkpoint(checkpoint, t5=t5, vae=vae, denoiser=denoiser, random_weights=random_weights)
    plan = _plan(gpu, model_cfg, precision)
    precisions = {n: c.precision for n, c in plan.components.items()}
    if quantize is not None:
        quantize.check(precisions, model_cfg.name, model_cfg.random_init_seed, parts)
    elif any(c.needs_calibration for c in plan.components.values()):
        raise OsxError(f"{', '.join(n for n, c in plan.components.items() if c.needs_calibration)} planned at int8/fp8 "
                       "needs calibrated graphs", hint="export with `osx export --calibration DIR` (from `osx calibrate`)")

    from osx.export.reference import build_reference

    with BundleWriter(out, force=force) as writer:  # refuses an existing --out without --force, first
        say(f"building {model_cfg.name} in PyTorch from "
            + ("seeded random weights" if parts is None else ", ".join(f"{k}={v}" for k, v in parts.items())))
        ref = build_reference(model_cfg, checkpoint=parts)
        specs = component_specs(model_cfg)
        names = [n for n in COMPONENTS if n in plan.components or (n == "vae_encoder" and with_vae_encoder)]
        components: dict[str, dict] = {}
        for i, name in enumerate(names):
            cplan = plan.components.get(name)
            comp_dtype = "fp32" if name in NEVER_FP16 else dtype
            io = specs[name].with_dims(**span(cplan.profiles)) if cplan else specs[name]
            io = io.with_precision(DTYPES[comp_dtype][0])
            module = getattr(ref, SOURCE[name])
            extra = {}
            if name == "denoiser":  # the learned null caption, before any cast to fp16
                np.save(writer.dir / NULL_TEXT_FILE, module.null_text(1)[0].float().numpy())
                extra["null_text_file"] = NULL_TEXT_FILE

            shapes = validation_shapes(io)
            # fp16: PyTorch's fp32 outputs first (the export casts the module in place), to measure how far
            # fp16 itself moves them; the tolerance follows that (osx.export.validate).
            fp32_cases = torch_reference(module, io, shapes, "fp32") if comp_dtype == "fp16" else None

            info = export_component(module, specs[name], writer.dir / f"{name}.onnx", dtype=comp_dtype, opset=opset,
                                    external_data_threshold=external_data_threshold,
                                    progress=lambda m, n=name: say(f"{n}: {m}"))
            say(f"{name}: validating against PyTorch at {len(shapes)} shapes (onnxruntime CPU)")
            cases = torch_reference(module, io, shapes, comp_dtype)
            del module
            if all(SOURCE[n] != SOURCE[name] for n in names[i + 1:]):  # last use: free its weights first
                setattr(ref, SOURCE[name], None)
                gc.collect()
            validation = {"torch_fp16_vs_fp32": fp16_noise(fp32_cases, cases)} if fp32_cases else {}
            tolerance = fp16_tolerance(validation["torch_fp16_vs_fp32"]) if fp32_cases else None
            rows = compare_onnx(writer.dir / info.file, io, cases, comp_dtype, tolerance)
            progress(format_table(rows))

            entry = {
                "file": info.file,
                **({"data_file": info.data_file} if info.data_file else {}),
                "precision": comp_dtype,
                "backend": cplan.backend if cplan else "onnxruntime",
                "plan_precision": cplan.precision if cplan else comp_dtype,
                "io": io.to_dict(),
                "onnx_dims": {d: dataclasses.asdict(r) for d, r in specs[name].dims.items()},
                "shape_ranges": [{d: dataclasses.asdict(r) for d, r in p.items()} for p in cplan.profiles] if cplan else [],
                "validation": {"tolerance": rows[0]["tolerance"], **validation, "rows": rows},
                "op_counts": info.op_counts,
                "nodes": info.nodes,
                "opset": info.opset,
                "exporter": info.exporter,
                "cleanup": info.cleanup,
                "export_seconds": info.seconds,
                "notes": ([f"{NEVER_FP16[name]}: exported in float32"] if name in NEVER_FP16 and dtype != "fp32" else []) + info.notes,
                **extra,
            }
            components[name] = entry
        say(f"writing {TOKENIZER_FILE}")
        ref.tokenizer.save(str(writer.dir / TOKENIZER_FILE))  # tiny: built at export; real: from spiece.model
        del ref
        gc.collect()
        body = {
            "model": {"name": model_cfg.name, "family": model_cfg.family, "config": model_cfg.to_dict()},
            "components": components,
            "tokenizer": {"file": TOKENIZER_FILE, "max_length": model_cfg.text_encoder.max_length},
            "scheduler": dataclasses.asdict(model_cfg.scheduler),
            "profile": plan.to_dict(),
        }
        if quantize is not None:  # before engines: TensorRT builds from the Q/DQ graphs
            body = quantize.apply(writer.dir, body, precisions, say)
            components = body["components"]

        if any(c.backend == "tensorrt" for c in plan.components.values()):
            from osx.export.engines import build_engines, record_engine

            say(f"building TensorRT engines for {plan.profile.name}")
            for name, engine in build_engines(writer.dir, components, plan, portable=portable).items():
                components[name] = record_engine(components[name], engine)

        manifest = writer.commit({
            **body,
            "build": versions(),
            "export": {
                "weights": {"random_seed": model_cfg.random_init_seed} if parts is None
                else {k: str(v) for k, v in parts.items()},
                "dtype": dtype, "precision": precision, "opset": opset, "gpu": gpu,
                "seconds": round(time.perf_counter() - start, 1),
            },
        })
    say(f"wrote {Path(out)} ({format_bytes(sum(f['bytes'] for f in manifest['files'].values()))}, "
        f"{len(manifest['files'])} files)")
    return manifest


def span(profiles: list[dict[str, DimRange]]) -> dict[str, DimRange]:
    """One range covering every optimisation profile of a component (opt: the first profile's)."""
    dims = {}
    for d in profiles[0]:
        lo, hi = min(p[d].min for p in profiles), max(p[d].max for p in profiles)
        dims[d] = DimRange(lo, min(max(profiles[0][d].opt, lo), hi), hi)
    return dims


def _plan(gpu: str, model_cfg: ModelConfig, precision: str):
    from osx.profiles import detect_profile, load_profile, plan_that_fits

    profile = detect_profile()[0] if gpu == "auto" else load_profile(gpu)
    return plan_that_fits(profile, model_cfg, precision)


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript
    import onnxslim
    import torch

    return {"osx": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "onnxslim": onnxslim.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


# --- checkpoint folders ---------------------------------------------------------------------------------


def resolve_checkpoint(checkpoint, *, t5=None, vae=None, denoiser=None, random_weights: bool = False) -> dict[str, Path] | None:
    """{"denoiser", "vae", "t5"} paths from a checkpoint folder and/or explicit paths (which win);
    None for random weights. Every problem is a CheckpointError saying which part and where."""
    given = {k: Path(v) for k, v in (("denoiser", denoiser), ("vae", vae), ("t5", t5)) if v is not None}
    if random_weights:
        if checkpoint is not None or given:
            raise OsxError("--random-weights cannot be combined with --checkpoint/--denoiser/--vae/--t5",
                           hint="drop --random-weights to export a checkpoint, or drop the checkpoint paths")
        return None
    if checkpoint is None and len(given) < len(CHECKPOINT_PARTS):
        missing = [p for p in CHECKPOINT_PARTS if p not in given]
        raise OsxError("no weights given" if not given else f"no {', '.join(missing)} weights given",
                       hint="pass --checkpoint DIR (holding the denoiser, VAE and T5 files), or --random-weights")
    parts = dict(given)
    if checkpoint is not None:
        found = find_checkpoint_parts(Path(checkpoint))
        for part in CHECKPOINT_PARTS:
            if part not in parts:
                if part not in found:
                    raise CheckpointError(
                        f"checkpoint folder {checkpoint} has no {_PART_NAMES[part]}",
                        hint=f"put it in the folder (file or subfolder), or pass --{part} PATH",
                    )
                parts[part] = found[part]
    for part, path in parts.items():
        if not path.exists():
            raise CheckpointError(f"{_PART_NAMES[part]} {path} does not exist", hint=f"check the --{part} path")
    if not (parts["t5"].is_dir() and (parts["t5"] / "spiece.model").is_file()):
        raise CheckpointError(f"T5 {parts['t5']} is not a T5 folder with spiece.model",
                              hint="point --t5 at the folder of DeepFloyd/t5-v1_1-xxl (weight shards, index, spiece.model)")
    return parts


_PART_NAMES = {"denoiser": "denoiser (STDiT3) weights", "vae": "VAE weights", "t5": "T5 text encoder folder"}
# Key prefixes that identify each part's state dict (after wrapper prefixes such as "module.").
_SIGNATURES = {"denoiser": ("x_embedder.", "spatial_blocks.", "y_embedder."), "vae": ("spatial_vae.", "temporal_vae."),
               "t5": ("encoder.block.", "shared.")}
_NAME_HINTS = {"denoiser": ("stdit", "denoiser", "dit"), "vae": ("vae",), "t5": ("t5",)}


def find_checkpoint_parts(folder: Path) -> dict[str, Path]:
    """Which entry of `folder` is the denoiser, the VAE and the T5 encoder: each entry (a weights file,
    or a subfolder holding weights) is identified by its tensor names where they can be read without
    loading the weights (safetensors headers, shard indexes), else by its name. The T5 entry is a
    folder (it holds spiece.model); a folder holding spiece.model itself counts as the T5 part."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist or is not a folder",
                              hint="pass the folder holding the denoiser, VAE and T5 files")
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        part = _identify(entry)
        if part is None:
            continue
        if part in found:
            raise CheckpointError(f"{folder} holds two {_PART_NAMES[part]}: {found[part].name} and {entry.name}",
                                  hint=f"keep one, or choose with --{part} PATH")
        found[part] = entry
    return found


def _identify(entry: Path) -> str | None:
    if entry.name.startswith("."):
        return None
    keys = _peek_keys(entry)
    if keys is None:  # not weights
        return None
    keys = [k.removeprefix("module.").removeprefix("ema.") for k in keys]
    for part, prefixes in _SIGNATURES.items():
        if any(k.startswith(prefixes) for k in keys):
            return part
    name = entry.name.lower()
    for part, hints in _NAME_HINTS.items():
        if any(h in name for h in hints):
            return part
    return None


def _peek_keys(entry: Path) -> list[str] | None:
    """Tensor names of a weights file or folder without reading the tensors ([] if only a pickle,
    whose names need the whole file); None if `entry` holds no weights."""
    if entry.is_dir():
        inner = sorted(p for p in entry.iterdir() if p.name.endswith(".index.json") or p.suffix in WEIGHT_SUFFIXES)
        if not inner:
            return None
        keys: list[str] = []
        for p in inner:
            keys += _peek_keys(p) or []
        return keys
    if entry.name.endswith(".index.json") or entry.suffix == ".safetensors":
        from osx.export.checkpoint import tensor_names

        return tensor_names(entry)
    return [] if entry.suffix in WEIGHT_SUFFIXES else None
