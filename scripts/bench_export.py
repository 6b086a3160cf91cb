"""Export benchmark: one real-size component with seeded random weights -> ONNX, timed, peak RSS measured.

    python scripts/bench.py export                       # STDiT3 (opensora-v1.2), fp16, on this CPU
    python scripts/bench.py export --validate            # + onnxruntime-vs-torch validation at 2 shapes
    python scripts/bench.py export --component text_encoder --dtype fp32 --layers 4   # T5-XXL widths, 4 layers

The export runs in a child process (so the peak resident set is the export's alone: weights built
directly in the export dtype, then export_component, then optional validation in the exporter's
order: torch reference, drop the weights, onnxruntime). Target: peak RSS <= 2.5x the weights.
Validation here compares with PyTorch in the same dtype at the plain tolerance (no fp32 weights exist
to measure fp16's own error, see osx.export.validate); a miss is reported, not raised.
`--layers` shortens the stack (denoiser depth / T5 layers) at full width, for extrapolating to a
model that does not fit this machine: the T5-XXL encoder is 19 GB in fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_RATIO = 2.5


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench.py export")
    p.add_argument("--model", default="opensora-v1.2")
    p.add_argument("--component", default="denoiser", choices=["denoiser", "text_encoder"])
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16"])
    p.add_argument("--layers", type=int, default=None, help="denoiser depth / T5 layers (default: the model's)")
    p.add_argument("--validate", action="store_true", help="also validate against torch at two small shapes")
    p.add_argument("--out", default=None, help="folder for the ONNX files (default: a temporary one, removed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    if args.child:
        return _child(args)
    with tempfile.TemporaryDirectory(prefix="osx-bench-export-") as tmp:
        out = args.out or tmp
        cmd = [sys.executable, __file__, *argv, "--child", "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"export child failed ({done.returncode}):\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
    result["peak_rss_over_weights"] = round(result["peak_rss_bytes"] / result["weight_bytes"], 2)
    result["target_ratio"] = TARGET_RATIO
    result["meets_target"] = result["peak_rss_over_weights"] <= TARGET_RATIO
    return result


def _build(args):
    """The component at full width in the export dtype, filled with seeded random weights: built with
    that default dtype so no float32 copy ever exists (the real STDiT3 is 4.8 GB in fp32)."""
    import dataclasses

    import torch

    from osx.components import component_specs
    from osx.export.init import seeded_init_
    from osx.export.reference import random_init_std
    from osx.models import get_model_config

    cfg = get_model_config(args.model)
    if args.layers is not None:
        if args.component == "denoiser":
            cfg = dataclasses.replace(cfg, denoiser=dataclasses.replace(cfg.denoiser, depth=args.layers))
        else:
            cfg = dataclasses.replace(cfg, text_encoder=dataclasses.replace(cfg.text_encoder, num_layers=args.layers))
    torch.set_default_dtype(torch.float16 if args.dtype == "fp16" else torch.float32)
    try:
        if args.component == "denoiser":
            from osx.export.stdit3 import STDiT3

            module, std = STDiT3(cfg.denoiser), random_init_std(cfg)["denoiser"]
        else:
            from osx.export.t5 import T5TextEncoder

            module, std = T5TextEncoder(cfg.text_encoder), random_init_std(cfg)["t5"]
    finally:
        torch.set_default_dtype(torch.float32)
    seeded_init_(module, cfg.random_init_seed, std=std)
    return cfg, component_specs(cfg)[args.component], module.eval().requires_grad_(False)


def _child(args) -> dict:
    import gc

    from osx.errors import ValidationError
    from osx.export.onnx_export import export_component
    from osx.export.validate import compare_onnx, torch_reference, validation_shapes

    start = time.perf_counter()
    cfg, spec, module = _build(args)
    unique = {t.untyped_storage().data_ptr(): t for t in module.state_dict().values()}  # T5 ties two names
    params = sum(t.numel() for t in unique.values())
    weight_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    built = time.perf_counter() - start
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dtype = args.dtype
    path = Path(args.out) / f"{spec.name}.onnx"
    info = export_component(module, spec, path, dtype=dtype, progress=lambda m: print(m, file=sys.stderr))
    exported = time.perf_counter() - start
    rss_exported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = None
    if args.validate:
        io = spec.with_precision("float16" if dtype == "fp16" else "float32")
        cases = torch_reference(module, io, validation_shapes(io), dtype)
        del module
        gc.collect()
        try:
            rows = compare_onnx(path, io, cases, dtype)
        except ValidationError as e:  # reported, not fatal: the figures are what this measures
            rows = e.rows
    result = {
        "model": cfg.name, "component": spec.name, "dtype": dtype, "layers": args.layers, "params": params,
        "weight_bytes": weight_bytes,
        "seconds": {"build": round(built, 1), "export": round(exported - built, 1), "total": round(time.perf_counter() - start, 1)},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_after_build_bytes": rss_built, "peak_rss_after_export_bytes": rss_exported,
        "onnx_bytes": path.stat().st_size, "data_file": info.data_file, "file_bytes": info.bytes,
        "nodes": info.nodes, "export_notes": len(info.notes),
        "validation": rows, "validation_passed": None if rows is None else all(r["ok"] for r in rows),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
