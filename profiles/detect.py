"""`--gpu auto`: read the installed GPU (NVML through nvidia-ml-py, else nvidia-smi), pick the nearest profile."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from osx.errors import OsxError
from osx.profiles.profile import GIB, Profile, load_profile, shipped_profiles


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int
    driver: str = ""
    cuda_driver: str = ""  # highest CUDA version the driver supports, e.g. "12.8"
    source: str = ""  # "nvml" | "nvidia-smi"

    @property
    def cc_text(self) -> str:
        return "%d.%d" % self.compute_capability


def _nvml() -> list[GpuInfo]:
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12080
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            out.append(GpuInfo(
                name=name.decode() if isinstance(name, bytes) else name,
                compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)),
                memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                driver=driver.decode() if isinstance(driver, bytes) else driver,
                cuda_driver=f"{cuda // 1000}.{cuda % 1000 // 10}",
                source="nvml",
            ))
        return out
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    text = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total,driver_version", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    return parse_nvidia_smi(text)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    out = []
    for line in text.strip().splitlines():
        name, cc, mem_mib, driver = (x.strip() for x in line.split(","))
        major, minor = cc.split(".")
        out.append(GpuInfo(name, (int(major), int(minor)), int(float(mem_mib)) << 20, driver, source="nvidia-smi"))
    return out


def detect_gpus() -> tuple[list[GpuInfo], list[str]]:
    """Every NVIDIA GPU found, and why each probe found none (for the error message)."""
    problems = []
    for probe, name in ((_nvml, "NVML"), (_nvidia_smi, "nvidia-smi")):
        try:
            gpus = probe()
        except Exception as e:  # no library, no driver, no device: each says so in its own way
            problems.append(f"{name}: {type(e).__name__}: {e}".strip())
            continue
        if gpus:
            return gpus, problems
        problems.append(f"{name}: no devices")
    return [], problems


def nearest_profile(gpu: GpuInfo, profiles: list[Profile]) -> tuple[Profile, str]:
    """The profile for `gpu`: one whose `match` regex names it, else the largest shipped card that this one
    covers (same or higher compute capability, at least as much memory), nearest compute capability first."""
    lowered = gpu.name.lower()
    memory_gib = gpu.memory_bytes / GIB
    gpu_profiles = [p for p in profiles if not p.is_cpu]
    # A name can cover variants with different memory (RTX 4060 Ti 8 GB / 16 GB): the largest that fits.
    named = [p for p in gpu_profiles if any(re.search(m, lowered) for m in p.match) and p.vram_gib <= memory_gib + 0.25]
    if named:
        p = max(named, key=lambda p: p.vram_gib)
        return p, f"detected {gpu.name} (compute capability {gpu.cc_text}, {memory_gib:.1f} GiB): using profile {p.name}"
    covered = [p for p in gpu_profiles if p.compute_capability <= gpu.compute_capability and p.vram_gib <= memory_gib + 0.25]
    if not covered:
        raise OsxError(f"no shipped profile fits {gpu.name} (compute capability {gpu.cc_text}, {memory_gib:.1f} GiB)",
                       hint="write your own profile TOML (copy profiles/rtx4060.toml) and pass --gpu path/to/it.toml")
    best = max(covered, key=lambda p: (p.compute_capability[0] == gpu.compute_capability[0], p.vram_gib, p.compute_capability))
    return best, (f"detected {gpu.name} (compute capability {gpu.cc_text}, {memory_gib:.1f} GiB): no profile names it; "
                  f"using {best.name} ({best.display_name}, {best.cc_text}, {best.vram_gib:g} GiB), the nearest it covers")


def detect_profile() -> tuple[Profile, str]:
    """For `--gpu auto`: the profile of GPU 0 and a sentence saying which and why."""
    gpus, problems = detect_gpus()
    if not gpus:
        raise OsxError("--gpu auto found no NVIDIA GPU (" + "; ".join(problems) + ")",
                       hint=f"pass --gpu NAME (one of {', '.join(shipped_profiles())}) or --gpu cpu")
    profile, why = nearest_profile(gpus[0], [load_profile(n) for n in shipped_profiles()])
    if len(gpus) > 1:
        why += f" (GPU 0 of {len(gpus)})"
    return profile, why
