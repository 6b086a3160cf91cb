"""The NVIDIA GPUs of this machine (NVML through nvidia-ml-py, else nvidia-smi): name, compute capability,
memory, driver. Torch-free and stdlib-only: the runtime's engine check and the planner's `--gpu auto` read it."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int
    driver: str = ""
    cuda_driver: str = ""  # highest CUDA version the driver supports, e.g. "12.8"
    source: str = ""  # "nvml" | "nvidia-smi"
    pci_bus_id: str = ""  # e.g. "00000000:01:00.0": how CUDA finds this GPU (its index may differ from NVML's)

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
            bus = pynvml.nvmlDeviceGetPciInfo(h).busId
            out.append(GpuInfo(
                name=name.decode() if isinstance(name, bytes) else name,
                compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h)),
                memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                driver=driver.decode() if isinstance(driver, bytes) else driver,
                cuda_driver=f"{cuda // 1000}.{cuda % 1000 // 10}",
                source="nvml",
                pci_bus_id=bus.decode() if isinstance(bus, bytes) else bus,
            ))
        return out
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> list[GpuInfo]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise FileNotFoundError("nvidia-smi is not on PATH")
    text = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total,driver_version,pci.bus_id", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    return parse_nvidia_smi(text)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    out = []
    for line in text.strip().splitlines():
        name, cc, mem_mib, driver, *bus = (x.strip() for x in line.split(","))
        major, minor = cc.split(".")
        out.append(GpuInfo(name, (int(major), int(minor)), int(float(mem_mib)) << 20, driver, source="nvidia-smi",
                           pci_bus_id=bus[0] if bus else ""))
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
