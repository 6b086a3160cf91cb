"""CUDA through cuda-python, for the TensorRT build and backend: error tuples, the driver check, the
device that was profiled (by PCI bus id), device and pinned host buffers.

cuda-python's major version must match the CUDA major of the installed TensorRT wheels (tensorrt-cu12 /
tensorrt-cu13, pyproject extras of the same names), and the driver must support that CUDA: CUDA 13 needs
driver 580 or newer (NVIDIA's CUDA 13.0 release notes), CUDA 12 needs 525.60.13 or newer (Linux).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re

import numpy as np

from osx.errors import OsxError

# CUDA major -> the oldest Linux driver that runs it (CUDA toolkit release notes, "minimum driver").
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}


def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise OsxError("cuda-python is not installed", hint="pip install -e '.[tensorrt-cu12]' (or tensorrt-cu13 "
                           "for driver >= 580; see README, Installing TensorRT)") from None
    return runtime


def check(result, what: str = "CUDA call"):
    """cuda-python calls return (error, *values): the values, or an error naming the call."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise OsxError(f"{what} failed: {err}", hint="check the GPU and its driver with `nvidia-smi` and `osx doctor`, "
                       "or run with --backend onnxruntime")
    return values[0] if len(values) == 1 else values


def _major(version: int) -> tuple[int, int]:
    return version // 1000, version % 1000 // 10


def tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheels were built for (tensorrt-cu12 / -cu13), if known."""
    for dist in importlib.metadata.distributions():
        m = re.fullmatch(r"tensorrt[-_](?:lean[-_]|dispatch[-_])?cu(\d+)(?:[-_]libs|[-_]bindings)?",
                         (dist.metadata["Name"] or "").lower())
        if m:
            return int(m.group(1))
    return None


def check_driver(rt=None) -> None:
    """The driver runs the CUDA that cuda-python (and TensorRT) were built for, and the two majors agree;
    otherwise an OsxError that names the driver needed or the package to install."""
    rt = rt or cudart()
    driver = _major(check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))
    runtime = _major(check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    if driver == (0, 0):
        raise OsxError("no NVIDIA driver is loaded (cudaDriverGetVersion returned 0)",
                       hint="install the NVIDIA driver, or run the bundle with --backend onnxruntime")
    if driver < runtime:
        need = MIN_DRIVER.get(runtime[0], f"one that supports CUDA {runtime[0]}.{runtime[1]}")
        older = [m for m in MIN_DRIVER if m <= driver[0]]
        instead = f", or pip install -e '.[tensorrt-cu{older[-1]}]' (CUDA {older[-1]} wheels)" if older else ""
        raise OsxError(f"the NVIDIA driver supports CUDA up to {driver[0]}.{driver[1]}, but cuda-python here is built "
                       f"for CUDA {runtime[0]}.{runtime[1]}", hint=f"install NVIDIA driver >= {need}{instead}")
    trt_major = tensorrt_cuda_major()
    if trt_major is not None and trt_major != runtime[0]:
        raise OsxError(f"TensorRT here is built for CUDA {trt_major}, cuda-python for CUDA {runtime[0]}",
                       hint=f"pip install -e '.[tensorrt-cu{trt_major}]' (it pins cuda-python to CUDA {trt_major})")


def normalize_bus_id(bus_id: str) -> str:
    """NVML's "00000000:01:00.0" -> CUDA's "0000:01:00.0" (domain:bus:device.function, hex)."""
    m = re.fullmatch(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F])", bus_id.strip())
    if not m:
        raise ValueError(f"not a PCI bus id: {bus_id!r}")
    domain, bus, device, function = (int(x, 16) for x in m.groups())
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function:x}"


def select_device(rt, pci_bus_id: str | None) -> int:
    """Make the GPU that was profiled (NVML's, by PCI bus id) CUDA's current device; its CUDA index.
    NVML numbers GPUs by bus id, CUDA fastest-first (unless CUDA_DEVICE_ORDER=PCI_BUS_ID): they can differ."""
    if pci_bus_id is None:
        device = 0
    else:
        err, device = rt.cudaDeviceGetByPCIBusId(normalize_bus_id(pci_bus_id).encode())
        if int(err) != 0:
            raise OsxError(f"the GPU at PCI bus id {pci_bus_id} is not visible to CUDA ({err})",
                           hint="check CUDA_VISIBLE_DEVICES, or unset it")
    check(rt.cudaSetDevice(device), "cudaSetDevice")
    return int(device)


class DeviceBuffer:
    """Device memory that grows on demand (cudaMalloc), reused across calls."""

    def __init__(self, rt):
        self.rt, self.ptr, self.nbytes = rt, 0, 0

    def reserve(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr, self.nbytes = int(check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc")), nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            check(self.rt.cudaFree(self.ptr), "cudaFree")
        self.ptr, self.nbytes = 0, 0


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost): asynchronous copies need it to overlap and to be
    truly asynchronous; `array(shape, dtype)` views it as NumPy without a copy."""

    def __init__(self, rt):
        self.rt, self.ptr, self.nbytes = rt, 0, 0

    def array(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes > self.nbytes:
            self.free()
            self.ptr, self.nbytes = int(check(self.rt.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost")), nbytes
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape, dtype=np.int64))).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            check(self.rt.cudaFreeHost(self.ptr), "cudaFreeHost")
        self.ptr, self.nbytes = 0, 0
