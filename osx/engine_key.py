"""Engine keys and the "can this machine run this engine" decision, as plain functions.

A TensorRT engine is tied to the TensorRT version that built it (unless built version-compatible) and
to the GPU architecture (unless built with a hardware-compatibility level). The manifest records the
complete key of every engine; `check_engine_compat` compares it with the machine and says exactly which
`osx build` command makes an engine that fits. Part of the bundle contract: export (build) and runtime
(load) share it; stdlib only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
from dataclasses import dataclass, field

from osx.components import DimRange
from osx.gpu import detect_gpus

KEY_VERSION = 1
HARDWARE_LEVELS = ("none", "same_compute_capability", "ampere_plus")
# Python packages of the three TensorRT runtimes: full (builder + runtime), lean (runs plans built
# version-compatible), dispatch (loads the lean runtime embedded in a version-compatible plan).
RUNTIME_PACKAGES = {"tensorrt": "tensorrt", "tensorrt_lean": "tensorrt_lean", "tensorrt_dispatch": "tensorrt_dispatch"}


def engine_key(*, onnx_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str,
               hardware_compatibility: str, version_compatible: bool, precision: str, calibration_hash: str | None,
               build_flags: dict, profiles: list[dict[str, DimRange]], buckets: dict[str, int]) -> dict:
    """Everything an engine depends on, plus `id`: a digest of it (also the engine's file name)."""
    if hardware_compatibility not in HARDWARE_LEVELS:
        raise ValueError(f"hardware_compatibility must be one of {HARDWARE_LEVELS}")
    key = {
        "key_version": KEY_VERSION,
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": tensorrt_version,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "hardware_compatibility": hardware_compatibility,
        "version_compatible": bool(version_compatible),
        "precision": precision,
        "calibration_hash": calibration_hash,
        "build_flags": dict(sorted(build_flags.items())),
        "profiles": [{d: [r.min, r.opt, r.max] for d, r in p.items()} for p in profiles],
        "buckets": dict(buckets),
    }
    # The GPU name does not change what a cc-targeted engine can run on; keep it out of the identity so
    # two cards of one architecture share engines, but keep it in the key for the user to read.
    identity = {k: v for k, v in key.items() if k != "gpu_name"}
    key["id"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return key


def key_profiles(key: dict) -> list[dict[str, DimRange]]:
    return [{d: DimRange(*v) for d, v in p.items()} for p in key["profiles"]]


def required_runtime(key: dict) -> str:
    """The TensorRT runtime package an engine needs: version-compatible plans carry their own lean
    runtime, so the small dispatch runtime (or lean / full) loads them."""
    return "tensorrt_dispatch" if key["version_compatible"] else "tensorrt"


def runtimes_that_load(key: dict) -> tuple[str, ...]:
    return ("tensorrt_dispatch", "tensorrt_lean", "tensorrt") if key["version_compatible"] else ("tensorrt",)


@dataclass(frozen=True)
class Machine:
    """What the engine check needs to know about this machine."""

    gpu_name: str | None
    compute_capability: tuple[int, int] | None
    runtimes: dict[str, str] = field(default_factory=dict)  # installed TensorRT runtime package -> version
    pci_bus_id: str | None = None  # the profiled GPU (NVML's numbering need not be CUDA's)

    @property
    def cc_text(self) -> str:
        return "none" if self.compute_capability is None else "%d.%d" % self.compute_capability


def installed_runtimes() -> dict[str, str]:
    out = {}
    for module in RUNTIME_PACKAGES:
        if importlib.util.find_spec(module) is None:
            continue
        try:
            out[module] = importlib.metadata.version(module.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:  # installed from a tarball, not pip
            out[module] = getattr(importlib.import_module(module), "__version__", "unknown")
    return out


def this_machine() -> Machine:
    gpus, _ = detect_gpus()
    gpu = gpus[0] if gpus else None
    return Machine(gpu.name if gpu else None, gpu.compute_capability if gpu else None, installed_runtimes(),
                   gpu.pci_bus_id or None if gpu else None)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def rebuild_command(bundle: str) -> str:
    return f"osx build {shlex.quote(str(bundle))} --gpu auto"


def check_engine_compat(entry, machine: Machine, bundle: str = "BUNDLE") -> str | None:
    """None if `machine` can run the engine of `entry` (osx.manifest.EngineEntry); else why not and the exact fix."""
    key = entry.key
    built = f"built with TensorRT {key['tensorrt_version']} on {key['gpu_name']} (compute capability {key['compute_capability']})"
    fix = f"; rebuild the engines on this machine: {rebuild_command(bundle)}"
    if machine.compute_capability is None:
        return f"{entry.file}: no NVIDIA GPU found on this machine (engine {built}); run the bundle with --backend onnxruntime"
    level = key["hardware_compatibility"]
    built_cc = _version(key["compute_capability"])
    if level == "ampere_plus":
        if machine.compute_capability < (8, 0):
            return (f"{entry.file}: portable (Ampere+) engine, but this GPU ({machine.gpu_name}) has compute capability "
                    f"{machine.cc_text} < 8.0{fix}")
    elif tuple(machine.compute_capability) != built_cc[:2]:
        return (f"{entry.file}: {built}; this GPU ({machine.gpu_name}) has compute capability {machine.cc_text}, "
                f"and the engine runs only on {key['compute_capability']}{fix}")
    loaders = [r for r in runtimes_that_load(key) if r in machine.runtimes]
    if not loaders:
        need = required_runtime(key)
        return (f"{entry.file}: needs the TensorRT runtime package {need!r}, which is not installed; "
                f"pip install {need.replace('_', '-')}=={key['tensorrt_version']}" + ("" if key["version_compatible"] else " (or later, with a rebuild)"))
    if loader_for(key, machine) is None:
        have = ", ".join(f"{r} {machine.runtimes[r]}" for r in loaders)
        if not key["version_compatible"]:
            return f"{entry.file}: {built}; this machine has TensorRT {have}, and engines run only on the version that built them{fix}"
        return (f"{entry.file}: {built} (version-compatible: runs on TensorRT >= {key['tensorrt_version']} through "
                f"tensorrt_dispatch or the full runtime, or on tensorrt_lean of exactly that version); this machine has "
                f"{have}; pip install tensorrt-dispatch>={key['tensorrt_version']}, or{fix[1:]}")
    return None


def loader_for(key: dict, machine: Machine) -> str | None:
    """The installed runtime package that loads this engine, or None. A native plan needs the full runtime
    of its exact version; a version-compatible plan loads on the dispatch or full runtime of that version or
    later (they run the lean runtime the plan embeds), but the lean runtime only runs plans of its own version."""
    built = _version(key["tensorrt_version"])
    for module in runtimes_that_load(key):
        have = machine.runtimes.get(module)
        if have is None:
            continue
        exact = not key["version_compatible"] or module == "tensorrt_lean"
        if _version(have) == built if exact else _version(have) >= built:
            return module
    return None


def select_engine(entries, machine: Machine, bundle: str = "BUNDLE"):
    """The first engine entry (osx.manifest.EngineEntry) this machine can run (native before portable), and
    why the others cannot: (entry or None, reasons)."""
    reasons = []
    ranked = sorted(entries, key=lambda e: e.key["hardware_compatibility"] != "none")
    for e in ranked:
        why = check_engine_compat(e, machine, bundle)
        if why is None:
            return e, reasons
        reasons.append(why)
    return None, reasons


def pick_profile(profiles: list[dict[str, DimRange]], sizes: dict[str, int]) -> int | None:
    """Index of the first optimisation profile whose ranges contain `sizes` (dims it lacks are ignored)."""
    for i, p in enumerate(profiles):
        if all(r.contains(sizes[d]) for d, r in p.items() if d in sizes):
            return i
    return None
