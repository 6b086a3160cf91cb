"""TensorRT engines from a bundle's ONNX graphs.

One engine per component, with one optimisation profile per shape bucket of the plan (weights stored
once; the runtime selects the profile of a request's bucket). Every engine is built **strongly typed**
from a graph whose types are the engine's: fp16 / bf16 engines from an fp16 / bf16 graph (the bundle's,
or its fp32 graph cast by `osx.export.typed_graph`), INT8 / FP8 from the calibrated Q/DQ graph (16-bit
outside Q/DQ). No precision builder flag is set, so one code path serves TensorRT 10.8+ and 11 (which
removed BuilderFlag.FP16 / BF16). A timing cache beside the bundle makes rebuilds fast. `portable=True`
builds for every Ampere-or-newer GPU (hardware compatibility AMPERE_PLUS) and version-compatible, so an
end user needs only TensorRT's small dispatch runtime.

Every decision (settings, shapes, keys, file names, sources) is a plain function tested without a GPU;
`osx.export.trt_build` makes the TensorRT calls.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from osx.bundle import sha256_file
from osx.components import ComponentSpec, DimRange
from osx.errors import OsxError
from osx.manifest import ComponentEntry, EngineEntry
from osx.numeric import format_bytes
from osx.engine_key import Machine, check_engine_compat, engine_key, required_runtime, this_machine
from osx.profiles.planner import ComponentPlan, Plan
from osx.profiles.profile import MIN_COMPUTE_CAPABILITY, QUANTIZED

TARGET_TYPES = ("fp16", "bf16")  # float engines whose graph can be cast from fp32 (osx.export.typed_graph)

ENGINE_DIR = "engines"
__all__ = ["build_engines", "build_settings", "check_build_machine", "check_engine_compat", "engine_file", "engine_key",
           "onnx_source", "profile_shapes", "timing_cache_path"]


# --- decisions (pure) ---------------------------------------------------------------------------------


def build_settings(cplan: ComponentPlan, *, portable: bool = False) -> dict:
    """Builder flags for one component: plain values, recorded in the engine key."""
    if portable and cplan.precision == "fp8":
        raise OsxError(f"{cplan.name}: a --portable engine must run on every Ampere-or-newer GPU, and FP8 needs "
                       "compute capability >= 8.9", hint="build portable engines with --precision int8, fp16 or bf16")
    settings = {
        "precision": cplan.precision,
        "strongly_typed": True,  # the graph's types are the engine's (the only mode TensorRT 11 has)
        "tf32": False,  # fp32 components stay exact fp32 (T5 on pre-Ampere cards)
        "hardware_compatibility": "ampere_plus" if portable else "none",
        "version_compatible": portable,
        "exclude_lean_runtime": False,  # a portable plan carries its lean runtime
        "workspace_bytes": cplan.workspace_bytes,
    }
    if cplan.streamed_bytes:  # TensorRT weight streaming: built streamable, run with this much weight on the card
        settings["weight_streaming_budget"] = cplan.weight_bytes - cplan.streamed_bytes
    return settings


def profile_shapes(spec: ComponentSpec, dims: dict[str, DimRange]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """{input name: (min shape, opt shape, max shape)} for one optimisation profile."""
    out = {}
    for t in spec.inputs:
        shapes = []
        for pick in ("min", "opt", "max"):
            shape = spec.resolve(t, {d: getattr(r, pick) for d, r in dims.items()})
            if None in shape:
                raise ValueError(f"{spec.name}.{t.name}: dimension of {t.shape} not set by the profile dims {sorted(dims)}")
            shapes.append(shape)
        out[t.name] = tuple(shapes)
    return out


def onnx_source(entry: ComponentEntry, precision: str) -> tuple[str, str | None]:
    """(the bundle file an engine at `precision` is built from, the fp32 file to cast it from first or None).

    Strongly typed engines take the graph's types: INT8/FP8 build from the calibrated Q/DQ graph, fp16 /
    bf16 from a graph of that type, fp32 from the fp32 graph. A missing fp16 / bf16 graph is made from the
    fp32 one (`<stem>.<precision>.onnx`, added to the bundle). `entry` is the component's manifest entry:
    its file at its precision, and the further variants in `onnx_files` ({precision: file})."""
    files = {**entry.onnx_files, entry.precision: entry.file}
    name = entry.io.name
    if precision in files:
        return files[precision], None
    if precision in QUANTIZED:
        floats = [p for p in files if p not in QUANTIZED]
        instead = "pass --precision fp16 or bf16" if floats else f"re-export it with --precision {precision}"
        raise OsxError(f"{name}: the plan wants {precision}, but the bundle has "
                       f"no calibrated {precision} QDQ graph (it has {', '.join(sorted(files))})",
                       hint=f"{instead} (`osx calibrate`, then `osx export --precision {precision} --calibration ...`)")
    if precision in TARGET_TYPES and "fp32" in files:
        stem = files["fp32"].removesuffix(".onnx")
        return f"{stem}.{precision}.onnx", files["fp32"]
    raise OsxError(f"{name}: no {precision} ONNX graph in the bundle for a strongly typed {precision} engine, and "
                   f"no fp32 graph to cast one from (it has {', '.join(sorted(files))})",
                   hint=f"re-export the bundle with --dtype fp32 (osx build casts it to {precision})")


def check_build_machine(plan: Plan, machine: Machine, portable: bool) -> None:
    """The GPU that builds must have every precision the plan uses (and be Ampere+ for portable engines)."""
    if machine.compute_capability is None:
        raise OsxError("building TensorRT engines needs an NVIDIA GPU, and none was found",
                       hint="build on the target machine (`osx build BUNDLE --gpu auto`), or export with --gpu cpu")
    if "tensorrt" not in machine.runtimes:
        raise OsxError("building TensorRT engines needs the full TensorRT package (not only the lean runtime)",
                       hint="pip install -e '.[tensorrt]' (see README, GPU profiles and TensorRT)")
    if portable and machine.compute_capability < (8, 0):
        raise OsxError(f"--portable engines are built on an Ampere or newer GPU; this one ({machine.gpu_name}) is {machine.cc_text}")
    for c in plan.components.values():
        need = MIN_COMPUTE_CAPABILITY[c.precision]
        if c.backend == "tensorrt" and machine.compute_capability < need:
            raise OsxError(f"the plan ({plan.profile.name}) runs {c.name} at {c.precision}, which needs compute capability "
                           f"{need[0]}.{need[1]}; this GPU ({machine.gpu_name}) has {machine.cc_text}",
                           hint="plan for this GPU: --gpu auto")


def engine_file(component: str, key: dict) -> str:
    return f"{ENGINE_DIR}/{component}-{key['precision']}-{key['id']}.plan"


def timing_cache_path(bundle_dir: str | os.PathLike, tensorrt_version: str, compute_capability: str) -> Path:
    """Beside the bundle (not in it: the bundle's file list is fixed), one per TensorRT version and GPU arch."""
    b = Path(bundle_dir).absolute()
    return b.parent / f".{b.name}.trt{tensorrt_version}-sm{compute_capability.replace('.', '')}.timing-cache"


# --- the build ----------------------------------------------------------------------------------------


def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise OsxError("building TensorRT engines needs the tensorrt package",
                       hint="pip install -e '.[tensorrt-cu12]' (driver >= 525) or '.[tensorrt-cu13]' (driver >= 580)") from None
    return trt


def build_engines(bundle_dir: str | os.PathLike, components: dict[str, ComponentEntry], plan: Plan, *, portable: bool = False,
                  timing_cache: str | os.PathLike | None = None, bundle_path: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, EngineEntry]:
    """Build the TensorRT engine of every component the plan runs on TensorRT.

    `components`: {name: manifest component entry}, files relative to `bundle_dir`. Engines are written to `bundle_dir/engines/`,
    typed graphs cast from fp32 beside the fp32 graph. `bundle_path`: where the bundle will live when
    `bundle_dir` is BundleWriter's temporary folder; the timing cache (unless `timing_cache` names one)
    is kept beside it, so the next build reuses it. Returns {name: engine manifest entry}; add each to
    its component with `ComponentEntry.with_engine`.
    """
    from osx.export.lint import lint_onnx
    from osx.export.trt_build import BuildRequest, build_engine
    from osx.export.typed_graph import cast_onnx_file
    from osx.runtime import cuda

    bundle_dir = Path(bundle_dir)
    machine = this_machine()
    check_build_machine(plan, machine, portable)
    trt = _import_tensorrt()
    rt = cuda.cudart()
    cuda.check_driver(rt)
    cuda.select_device(rt, machine.pci_bus_id)  # TensorRT builds for the current device: the profiled one
    trt_version = machine.runtimes["tensorrt"]
    cache = Path(timing_cache) if timing_cache else timing_cache_path(bundle_path or bundle_dir, trt_version, machine.cc_text)
    out = {}
    for name, entry in components.items():
        cplan = plan.components.get(name)
        if cplan is None or cplan.backend != "tensorrt":
            continue
        settings = build_settings(cplan, portable=portable)
        source, cast_from = onnx_source(entry, cplan.precision)
        onnx_path = bundle_dir / source
        if cast_from is not None and not onnx_path.exists():
            if progress:
                print(f"{name}: casting {cast_from} to {cplan.precision} ({source}) for a strongly typed engine")
            cast_onnx_file(bundle_dir / cast_from, onnx_path, cplan.precision)
        errors = [i for i in lint_onnx(onnx_path, trt_version) if i.severity == "error"]
        if errors:
            raise OsxError(f"{source}: TensorRT {trt_version} cannot build it: " + "; ".join(map(str, errors[:5]))
                           + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""),
                           hint="fix the export (see `osx export --dry-run` for the full lint)")
        spec = entry.io
        key = engine_key(
            onnx_sha256=sha256_file(onnx_path), tensorrt_version=trt_version, gpu_name=machine.gpu_name,
            compute_capability=machine.cc_text, hardware_compatibility=settings["hardware_compatibility"],
            version_compatible=settings["version_compatible"], precision=cplan.precision,
            calibration_hash=entry.calibration_hash, build_flags=settings, profiles=cplan.profiles,
            buckets=cplan.bucket_profile,
        )
        rel = engine_file(name, key)
        target = bundle_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        request = BuildRequest(name, onnx_path, [profile_shapes(spec, dims) for dims in cplan.profiles],
                               settings["workspace_bytes"], portable, cache, progress,
                               weight_streaming="weight_streaming_budget" in settings)
        engine_bytes, cache_bytes = build_engine(trt, request)
        _write_atomic(target, engine_bytes)
        if cache_bytes:
            _write_atomic(cache, cache_bytes)
        seconds = round(time.monotonic() - start, 1)
        out[name] = EngineEntry(file=rel, key=key, onnx_file=source, runtime=required_runtime(key),
                                load_one_at_a_time=plan.load_one_at_a_time,
                                report={"build_seconds": seconds, "bytes": target.stat().st_size,
                                        **({"notes": request.notes} if request.notes else {})})
        if progress:
            print(f"{name}: {rel} ({format_bytes(target.stat().st_size, 2)}, {seconds:.0f} s)")
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
