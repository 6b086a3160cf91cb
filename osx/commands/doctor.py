"""`osx doctor [BUNDLE]`: what this machine has (GPU, driver, CUDA, TensorRT runtimes, onnxruntime
providers) and what it can run; with a bundle, whether each of its engines loads here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path

import click

from osx import __version__
from osx.errors import OsxError
from osx.families import MODELS

DEFAULT_MODEL = next(iter(MODELS))  # the first declared model


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gather_facts() -> dict:
    """Probe this machine. Every probe that fails says why instead of raising."""
    from osx.engine_key import installed_runtimes
    from osx.gpu import detect_gpus

    gpus, problems = detect_gpus()
    facts = {
        "osx": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpus": [{"name": g.name, "compute_capability": g.cc_text, "memory_bytes": g.memory_bytes,
                  "driver": g.driver, "cuda_driver": g.cuda_driver} for g in gpus],
        "gpu_problems": problems,
        "tensorrt": installed_runtimes(),
        "cuda_python": _version("cuda-python"),
        "cuda_runtime": None,
        "polygraphy": _version("polygraphy"),
        "onnxruntime": None,
        "onnxruntime_providers": [],
    }
    if facts["cuda_python"] and gpus:
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
            err, v = cudart.cudaRuntimeGetVersion()
            facts["cuda_runtime"] = f"{v // 1000}.{v % 1000 // 10}" if int(err) == 0 else f"error {err}"
        except Exception as e:  # libcudart missing or unloadable
            facts["cuda_runtime"] = f"unavailable ({type(e).__name__}: {e})"
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        facts["onnxruntime"] = ort.__version__
        facts["onnxruntime_providers"] = list(ort.get_available_providers())
    return facts


def _machine(facts: dict):
    from osx.engine_key import Machine

    g = facts["gpus"][0] if facts["gpus"] else None
    cc = tuple(int(x) for x in g["compute_capability"].split(".")) if g else None
    return Machine(g["name"] if g else None, cc, dict(facts["tensorrt"]))


def report(facts: dict, model: str = DEFAULT_MODEL, manifest=None, bundle: str = "BUNDLE") -> tuple[list[str], bool]:
    """Lines to print, and whether everything asked about (the bundle, if given) can run here."""
    from osx.families import get_model_config
    from osx.profiles import allowed_precisions, load_profile, make_plan, nearest_profile, shipped_profiles
    from osx.engine_key import select_engine
    from osx.gpu import GpuInfo
    from osx.numeric import format_bytes

    lines = [f"osx {facts['osx']} on Python {facts['python']} ({facts['platform']})", ""]
    gpus = facts["gpus"]
    if gpus:
        for i, g in enumerate(gpus):
            lines.append(f"GPU {i}: {g['name']}, compute capability {g['compute_capability']}, {format_bytes(g['memory_bytes'])}, "
                         f"driver {g['driver'] or '?'}" + (f" (CUDA {g['cuda_driver']})" if g["cuda_driver"] else ""))
    else:
        lines.append("GPU: none found (" + "; ".join(facts["gpu_problems"]) + ")")
    lines.append(f"CUDA: cuda-python {facts['cuda_python'] or 'not installed'}" +
                 (f", runtime {facts['cuda_runtime']}" if facts["cuda_runtime"] else ""))
    trt = facts["tensorrt"]
    lines.append("TensorRT: " + (", ".join(f"{k} {v}" for k, v in trt.items()) if trt else "not installed") +
                 (f"; polygraphy {facts['polygraphy']}" if facts["polygraphy"] else ""))
    lines.append(f"onnxruntime: {facts['onnxruntime'] or 'not installed'}" +
                 (f", providers {', '.join(facts['onnxruntime_providers'])}" if facts["onnxruntime_providers"] else ""))
    lines += ["", "this machine can:"]
    cpu_ok = bool(facts["onnxruntime"])
    lines.append(("  - run bundles on the CPU (onnxruntime)" if cpu_ok else "  - NOT run bundles: install onnxruntime"))
    if "CUDAExecutionProvider" in facts["onnxruntime_providers"]:
        lines.append("  - run ONNX components on the GPU (onnxruntime CUDA provider)")
    ok = True
    if gpus:
        machine = _machine(facts)
        cc = machine.compute_capability
        precisions = ", ".join(allowed_precisions("denoiser", cc))
        if "tensorrt" in trt:
            lines.append(f"  - build TensorRT engines here (osx build BUNDLE --gpu auto) and run them; precisions: {precisions}")
        elif trt:
            lines.append("  - run portable (version-compatible) engines only: the lean/dispatch runtime cannot build; "
                         "for native engines pip install -e '.[tensorrt]'")
        else:
            lines.append("  - NOT run TensorRT engines: pip install -e '.[tensorrt]' (see README, GPU profiles and TensorRT)")
        try:
            g = gpus[0]
            info = GpuInfo(g["name"], cc, g["memory_bytes"])
            profile, why = nearest_profile(info, [load_profile(n) for n in shipped_profiles()])
            lines.append(f"  - profile: {why}")
            plan = make_plan(profile, get_model_config(model))
            lines.append(f"  - {model} with --gpu {profile.name}: peak {format_bytes(plan.run_peak_bytes, 2)} to run, "
                         f"{format_bytes(plan.build_peak_bytes, 2)} to build, budget {format_bytes(plan.budget_bytes, 2)}: "
                         + ("fits" if plan.fits else "does not fit (see osx export --dry-run)"))
        except OsxError as e:
            lines.append(f"  - profile: {e.message}")
    else:
        lines.append("  - NOT run TensorRT engines: no NVIDIA GPU (export with --gpu cpu, or run on a GPU machine)")
    if manifest is not None:
        lines += ["", f"bundle {bundle}:"]
        machine = _machine(facts)
        for name, comp in manifest.components.items():
            engines = comp.engines
            if not engines:
                lines.append(f"  {name}: {comp.backend} ({comp.precision}): " +
                             ("ok" if cpu_ok else "needs onnxruntime"))
                ok &= cpu_ok
                continue
            entry, reasons = select_engine(engines, machine, bundle)
            if entry is not None:
                lines.append(f"  {name}: ok: {entry.file} (needs {entry.runtime}, installed)")
            else:
                ok = False
                lines.append(f"  {name}: cannot run here:")
                lines += [f"      {r}" for r in reasons]
    return lines, ok


@click.command("doctor")
@click.argument("bundle", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Model to check the nearest profile's plan for.")
@click.option("--json", "as_json", is_flag=True, help="Print the probed facts as JSON.")
def doctor(bundle: Path | None, model: str, as_json: bool):
    """Report GPU, driver, CUDA, TensorRT and onnxruntime providers, and what this machine can run.
    With BUNDLE: whether each component's engine loads here (exit 1 if one cannot)."""
    facts = gather_facts()
    manifest = None
    if bundle is not None:
        from osx import archive

        manifest, _ = archive.open_manifest(bundle)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    lines, ok = report(facts, model, manifest, str(bundle) if bundle else "BUNDLE")
    click.echo("\n".join(lines))
    if not ok:
        sys.exit(1)
