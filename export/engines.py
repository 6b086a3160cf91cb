"""TensorRT engines from a bundle's ONNX graphs, through polygraphy's loaders (as NVIDIA's diffusion demo).

One engine per component, with one optimisation profile per shape bucket of the plan (weights stored
once; the runtime selects the profile of a request's bucket). Precision comes from the plan: FP16/BF16
as builder flags on the floating-point graph; INT8/FP8 as strongly-typed networks from the calibrated
QDQ graph, so TensorRT takes the quantization exactly as calibrated. A timing cache beside the bundle
makes rebuilds fast. `portable=True` builds for every Ampere-or-newer GPU (hardware compatibility
AMPERE_PLUS) and version-compatible, so an end user needs only TensorRT's small dispatch/lean runtime.

Every decision (flags, shapes, keys, file names) is a plain function tested without a GPU; only
`build_engines` imports TensorRT.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from osx.bundle import sha256_file
from osx.components import ComponentSpec, DimRange
from osx.errors import OsxError
from osx.engine_key import Machine, check_engine_compat, engine_key, required_runtime, this_machine
from osx.profiles.planner import ComponentPlan, Plan
from osx.profiles.profile import GIB, MIN_COMPUTE_CAPABILITY, QUANTIZED

ENGINE_DIR = "engines"
__all__ = ["build_engines", "build_settings", "check_build_machine", "check_engine_compat", "engine_file", "engine_key",
           "onnx_source", "profile_shapes", "timing_cache_path"]


# --- decisions (pure) ---------------------------------------------------------------------------------


def build_settings(cplan: ComponentPlan, *, portable: bool = False) -> dict:
    """Builder flags for one component: plain values, recorded in the engine key."""
    if portable and cplan.precision == "fp8":
        raise OsxError(f"{cplan.name}: a --portable engine must run on every Ampere-or-newer GPU, and FP8 needs "
                       "compute capability >= 8.9", hint="build portable engines with --precision int8, fp16 or bf16")
    quantized = cplan.precision in QUANTIZED
    return {
        "precision": cplan.precision,
        "strongly_typed": quantized,  # QDQ graphs: types as calibrated; precision flags are not allowed then
        "fp16": cplan.precision == "fp16",
        "bf16": cplan.precision == "bf16",
        "tf32": False,  # fp32 components stay exact fp32 (T5 on pre-Ampere cards)
        "hardware_compatibility": "ampere_plus" if portable else "none",
        "version_compatible": portable,
        "exclude_lean_runtime": False,  # a portable plan carries its lean runtime
        "workspace_bytes": cplan.workspace_bytes,
    }


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


def onnx_source(entry: dict, precision: str) -> str:
    """The bundle file an engine at `precision` is built from. Float engines build from the floating-point
    graph (fp32 or fp16); INT8/FP8 from the calibrated QDQ graph. `entry` is the component's manifest entry:
    "file" with its "precision", and optionally "onnx_files": {precision: file} for further variants."""
    files = {**entry.get("onnx_files", {}), entry["precision"]: entry["file"]}
    floats = [p for p in files if p not in QUANTIZED]
    if precision in QUANTIZED:
        if precision in files:
            return files[precision]
        instead = "pass --precision fp16 or bf16" if floats else f"re-export it with --precision {precision}"
        raise OsxError(f"{entry.get('io', {}).get('name', 'component')}: the plan wants {precision}, but the bundle has "
                       f"no calibrated {precision} QDQ graph (it has {', '.join(sorted(files))})",
                       hint=f"{instead} (`osx calibrate`, then `osx export --precision {precision} --calibration ...`)")
    for candidate in ("fp32", precision, "fp16", "bf16"):
        if candidate in files and candidate not in QUANTIZED:
            return files[candidate]
    raise OsxError(f"no floating-point ONNX graph in the bundle for a {precision} engine (it has {', '.join(sorted(files))})",
                   hint="re-export the bundle without --precision int8/fp8 for this component")


def check_build_machine(plan: Plan, machine: Machine, portable: bool) -> None:
    """The GPU that builds must have every precision the plan uses (and be Ampere+ for portable engines)."""
    if machine.compute_capability is None:
        raise OsxError("building TensorRT engines needs an NVIDIA GPU, and none was found",
                       hint="build on the target machine (`osx build BUNDLE --gpu auto`), or export with --gpu cpu")
    if "tensorrt" not in machine.runtimes:
        raise OsxError("building TensorRT engines needs the full TensorRT package (not only the lean runtime)",
                       hint="pip install 'osx[tensorrt]' (see README, GPU profiles and TensorRT)")
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


# --- the build (TensorRT) ------------------------------------------------------------------------------


def _progress_monitor(label: str):
    """A TensorRT IProgressMonitor drawing one tqdm bar per build phase."""
    import tensorrt as trt
    from tqdm import tqdm

    class Bars(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars, self.depth = {}, {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            self.depth[phase_name] = depth
            self.bars[phase_name] = tqdm(total=num_steps, desc=f"{label}: {phase_name}", position=depth, leave=depth == 0,
                                         unit="step", dynamic_ncols=True)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Bars()


def _trt_config(settings: dict, spec: ComponentSpec, profiles: list[dict[str, DimRange]], timing_cache: Path | None, progress: str | None):
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile

    trt_profiles = []
    for dims in profiles:
        p = Profile()
        for name, (lo, opt, hi) in profile_shapes(spec, dims).items():
            p.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(p)
    portable = settings["hardware_compatibility"] == "ampere_plus"
    return CreateConfig(
        fp16=settings["fp16"],
        bf16=settings["bf16"],
        tf32=settings["tf32"],
        profiles=trt_profiles,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: settings["workspace_bytes"]} if settings["workspace_bytes"] else None,
        load_timing_cache=str(timing_cache) if timing_cache else None,
        hardware_compatibility_level=trt.HardwareCompatibilityLevel.AMPERE_PLUS if portable else None,
        version_compatible=settings["version_compatible"] or None,
        exclude_lean_runtime=settings["exclude_lean_runtime"] if settings["version_compatible"] else None,
        progress_monitor=_progress_monitor(progress) if progress else None,
    )


def build_engines(bundle_dir: str | os.PathLike, components: dict[str, dict], plan: Plan, *, portable: bool = False,
                  timing_cache: str | os.PathLike | None = None, bundle_path: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, dict]:
    """Build the TensorRT engine of every component the plan runs on TensorRT.

    `components`: {name: manifest component entry} ("file", "precision", "io", optional "onnx_files",
    "calibration_hash"), files relative to `bundle_dir`. Engines are written to `bundle_dir/engines/`.
    `bundle_path`: where the bundle will live when `bundle_dir` is BundleWriter's temporary folder; the
    timing cache (unless `timing_cache` names one) is kept beside it, so the next build reuses it.
    Returns {name: engine manifest entry} to append to that component's "engines" list.
    """
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.logger import G_LOGGER

    from osx.export.lint import lint_onnx

    bundle_dir = Path(bundle_dir)
    machine = this_machine()
    check_build_machine(plan, machine, portable)
    trt_version = machine.runtimes["tensorrt"]
    cache = Path(timing_cache) if timing_cache else timing_cache_path(bundle_path or bundle_dir, trt_version, machine.cc_text)
    G_LOGGER.module_severity = G_LOGGER.WARNING
    out = {}
    for name, entry in components.items():
        cplan = plan.components.get(name)
        if cplan is None or cplan.backend != "tensorrt":
            continue
        settings = build_settings(cplan, portable=portable)
        source = onnx_source(entry, cplan.precision)
        onnx_path = bundle_dir / source
        errors = [i for i in lint_onnx(onnx_path, trt_version) if i.severity == "error"]
        if errors:
            raise OsxError(f"{source}: TensorRT {trt_version} cannot build it: " + "; ".join(map(str, errors[:5]))
                           + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""),
                           hint="fix the export (see `osx export --dry-run` for the full lint)")
        spec = ComponentSpec.from_dict(entry["io"])
        key = engine_key(
            onnx_sha256=sha256_file(onnx_path), tensorrt_version=trt_version, gpu_name=machine.gpu_name,
            compute_capability=machine.cc_text, hardware_compatibility=settings["hardware_compatibility"],
            version_compatible=settings["version_compatible"], precision=cplan.precision,
            calibration_hash=entry.get("calibration_hash"), build_flags=settings, profiles=cplan.profiles,
            buckets=cplan.bucket_profile,
        )
        rel = engine_file(name, key)
        target = bundle_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=settings["strongly_typed"])
        config = _trt_config(settings, spec, cplan.profiles, cache if cache.exists() else None, name if progress else None)
        cache.parent.mkdir(parents=True, exist_ok=True)
        engine_bytes = EngineBytesFromNetwork(network, config, save_timing_cache=str(cache))()
        tmp = target.with_suffix(".plan.tmp")
        with open(tmp, "wb") as f:
            f.write(engine_bytes)
        os.replace(tmp, target)
        out[name] = {
            "file": rel,
            "key": key,
            "runtime": required_runtime(key),
            "onnx_file": source,
            "build_seconds": round(time.monotonic() - start, 1),
            "bytes": target.stat().st_size,
        }
        if progress:
            print(f"{name}: {rel} ({target.stat().st_size / GIB:.2f} GiB, {out[name]['build_seconds']:.0f} s)")
    return out
