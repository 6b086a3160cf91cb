"""TensorRT backend: deserialize a bundle's engine, NumPy in and out.

Load checks, each with a message that says how to fix it: an engine exists for this GPU's compute
capability (or is portable and the GPU is Ampere+), an installed TensorRT runtime can load it (the exact
version for native engines and for the lean runtime; that version or later through the dispatch or full
runtime for version-compatible ones), the manifest key is intact and still names the ONNX graph the
bundle carries, and the driver runs cuda-python's CUDA. The engine runs on the GPU that was profiled
(by PCI bus id). The plan file is memory-mapped, not read into a second copy. Host staging buffers are
pinned; device buffers and the stream go through cuda-python (runtime/cuda.py); `release()` frees them
and the engine's device memory. An engine the plan streams (TensorRT weight streaming, Open-Sora v2.0's MMDiT
on 12-16 GB cards) gets the plan's weight budget before its execution context is made.

Imports only numpy, tensorrt (or its lean / dispatch runtime), cuda-python and osx's torch-free modules.
"""

from __future__ import annotations

import importlib
import mmap

import numpy as np

from osx.bundle import Bundle
from osx.components import ComponentSpec
from osx.errors import BundleError, InputError, OsxError
from osx.manifest import EngineEntry, Manifest
from osx.numeric import format_bytes, from_bfloat16_bits, to_bfloat16_bits
from osx.engine_key import (
    engine_key, key_profiles, loader_for, pick_profile, rebuild_command, select_engine, this_machine,
)
from osx.runtime import cuda

# TensorRT DataType name -> NumPy dtype used on the host (bf16 travels as its raw 16 bits)
HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT32": np.int32, "INT64": np.int64,
               "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


def check_key(entry: EngineEntry, manifest: Manifest, component: str, bundle: str) -> None:
    """The key was not edited, and still names the ONNX graph in the bundle (an engine built from an
    older export is stale even if it loads)."""
    key = dict(entry.key)
    fields = {k: v for k, v in key.items() if k not in ("id", "key_version")}
    fields["profiles"] = key_profiles(key)
    if engine_key(**fields)["id"] != key.get("id"):
        raise BundleError(f"{component}: the manifest key of {entry.file} does not match its own id (edited?)",
                          hint=f"rebuild the engines: {rebuild_command(bundle)}")
    onnx_file = entry.onnx_file
    listed = manifest.files[onnx_file].sha256 if onnx_file in manifest.files else None
    if listed is not None and listed != key["onnx_sha256"]:
        raise BundleError(f"{component}: {entry.file} was built from a different {onnx_file} than the bundle carries",
                          hint=f"rebuild the engines: {rebuild_command(bundle)}")


class TrtBackend:
    """One component's engine. `load()`, then `run({input: array}) -> {output: array}`, then `release()`."""

    name = "tensorrt"

    def __init__(self, bundle: Bundle, component: str):
        self.bundle, self.component = bundle, component
        self.spec: ComponentSpec = bundle.spec(component)
        self.entry: EngineEntry | None = None
        self._selection: EngineEntry | None = None
        self._machine = None
        self.engine = self.context = self.runtime = self.stream = self.cudart = None
        self.device: int | None = None  # CUDA's index of the profiled GPU, once loaded
        self.buffers: dict[str, cuda.DeviceBuffer] = {}
        self.pinned: dict[str, cuda.PinnedBuffer] = {}
        self.active_profile: int | None = None
        self.weight_streaming: dict | None = None  # a streamable engine's split, once loaded (_stream_weights)

    @property
    def loaded(self) -> bool:
        return self.context is not None

    # --- the engine this machine runs, and its shapes ------------------------------------------------
    def engine_entry(self) -> EngineEntry:
        """The bundle's engine for this machine (chosen once, before loading anything); BundleError if none."""
        if self._selection is None:
            bundle_path = str(self.bundle.root)
            entries = self.bundle.components[self.component].engines
            if not entries:
                raise BundleError(f"{self.component}: the bundle has no TensorRT engine",
                                  hint=f"build them on this machine: {rebuild_command(bundle_path)}, or run with --backend onnxruntime")
            self._machine = this_machine()
            entry, reasons = select_engine(entries, self._machine, bundle_path)
            if entry is None:
                raise BundleError(f"{self.component}: no engine in the bundle runs on this machine:\n  " + "\n  ".join(reasons),
                                  hint=f"rebuild the engines on this machine: {rebuild_command(bundle_path)}")
            self._selection = entry
        return self._selection

    def limits(self) -> list[dict]:
        return self.engine_entry().profiles()

    def buckets(self) -> list[tuple[int, int, int]]:
        return self.engine_entry().buckets()

    @property
    def load_one_at_a_time(self) -> bool:
        return self.engine_entry().load_one_at_a_time

    # --- load ------------------------------------------------------------------------------------
    def load(self) -> "TrtBackend":
        if self.loaded:
            return self
        bundle_path = str(self.bundle.root)
        entry, machine = self.engine_entry(), self._machine
        check_key(entry, self.bundle.manifest, self.component, bundle_path)
        trt = self._import_runtime(entry, loader_for(entry.key, machine))
        cudart = cuda.cudart()
        cuda.check_driver(cudart)
        self.device = cuda.select_device(cudart, machine.pci_bus_id)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if entry.key["version_compatible"]:
            self.runtime.engine_host_code_allowed = True  # the plan carries its lean runtime; our own bundle
        with open(self.bundle.path(entry.file), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            self.engine = self.runtime.deserialize_cuda_engine(plan)  # a buffer: no second copy of the plan
        if self.engine is None:
            raise BundleError(f"{self.component}: TensorRT could not deserialize {entry.file} (see the log above)",
                              hint=f"rebuild the engines on this machine: {rebuild_command(bundle_path)}")
        self._check_io()
        self._stream_weights(entry)  # before the context: TensorRT sizes its device memory by the budget
        self.context = self.engine.create_execution_context()
        if self.context is None:
            need = self.engine.device_memory_size_v2
            raise OsxError(f"{self.component}: not enough GPU memory to run {entry.file} "
                           f"(its execution context needs {need / 2**30:.2f} GiB besides the weights)",
                           hint="release other components first (load_one_at_a_time), or use a smaller bucket")
        self.stream = cuda.check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.cudart, self.entry = cudart, entry
        self.profiles = entry.profiles()
        self.active_profile = None
        return self

    def _stream_weights(self, entry: EngineEntry) -> None:
        """A streamable engine (built where the plan streams its weights, profiles/planner_v2.py) keeps the plan's
        share of its weights on the card (the key's weight_streaming_budget: TensorRT's weight_streaming_budget_v2,
        at most every streamable weight; the few weights TensorRT cannot stream stay there anyway); the rest
        stays in TensorRT's pinned host copy and is streamed in at every call."""
        budget = entry.key["build_flags"].get("weight_streaming_budget")
        if budget is None:
            return
        streamable = int(self.engine.streamable_weights_size)
        if streamable <= 0:
            raise BundleError(f"{self.component}: the plan streams its weights, but {entry.file} was built without "
                              "TensorRT's weight-streaming flag", hint=self._rebuild_hint())
        want = min(int(budget), streamable)
        self.engine.weight_streaming_budget_v2 = want
        if int(self.engine.weight_streaming_budget_v2) != want:
            raise OsxError(f"{self.component}: TensorRT refused a weight-streaming budget of {format_bytes(want, 2)} "
                           f"(of {format_bytes(streamable, 2)} streamable weights; see the log above)", hint=self._rebuild_hint())
        self.weight_streaming = {"device_bytes": want, "streamed_bytes": streamable - want, "streamable_bytes": streamable}

    def _import_runtime(self, entry: EngineEntry, module: str | None):
        try:
            return importlib.import_module(module or "tensorrt")
        except ImportError:
            raise BundleError(f"{self.component}: no TensorRT runtime that loads {entry.file} is installed",
                              hint="pip install -e '.[tensorrt-cu12]' (or the runtime named in `osx doctor`)") from None

    def _check_io(self) -> None:
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = {t.name for t in self.spec.inputs + self.spec.outputs}
        if names != want:
            raise BundleError(f"{self.component}: the engine's tensors {sorted(names)} are not the component's {sorted(want)}",
                              hint=f"rebuild the engines: {rebuild_command(str(self.bundle.root))}")
        self.inputs = [t.name for t in self.spec.inputs]
        self.outputs = [t.name for t in self.spec.outputs]
        self.host_dtypes = {n: HOST_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}

    # --- run -------------------------------------------------------------------------------------
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.loaded:
            self.load()
        sizes = self.spec.sizes_of(inputs)
        index = pick_profile(self.profiles, sizes)
        if index is None:
            built = ", ".join(self.entry.key["buckets"]) or " | ".join(
                " ".join(f"{d} {r.min}..{r.max}" for d, r in p.items()) for p in self.profiles)
            raise InputError(f"{self.component}: sizes {sizes} are not among the shapes this engine was built for ({built})",
                             hint="request one of those sizes, or rebuild with a profile that covers it (osx build --gpu PROFILE.toml)")
        cudart, ctx = self.cudart, self.context
        if index != self.active_profile:
            if not ctx.set_optimization_profile_async(index, int(self.stream)):
                raise OsxError(f"{self.component}: TensorRT refused optimisation profile {index}", hint=self._rebuild_hint())
            self.active_profile = index
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.inputs:
            arr = inputs[name]
            host = self.pinned.setdefault(name, cuda.PinnedBuffer(cudart)).array(arr.shape, self.host_dtypes[name])
            host[...] = to_bfloat16_bits(arr) if self.host_dtypes[name] == np.uint16 else arr
            if not ctx.set_input_shape(name, host.shape):
                raise InputError(f"{self.component}: TensorRT refused shape {host.shape} for input {name!r}",
                                 hint="request one of the sizes the engine was built for")
            ptr = self.buffers.setdefault(name, cuda.DeviceBuffer(cudart)).reserve(host.nbytes)
            cuda.check(cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self.stream), "cudaMemcpyAsync")
            self._bind(name, ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise OsxError(f"{self.component}: TensorRT left output {name!r} unshaped {shape} (inputs incomplete)",
                               hint=self._rebuild_hint())
            host = self.pinned.setdefault(name, cuda.PinnedBuffer(cudart)).array(shape, self.host_dtypes[name])
            self._bind(name, self.buffers.setdefault(name, cuda.DeviceBuffer(cudart)).reserve(host.nbytes))
            results[name] = host
        if not ctx.execute_async_v3(int(self.stream)):
            raise OsxError(f"{self.component}: TensorRT execution failed (see the log above)",
                           hint="check the GPU with `osx doctor`; " + self._rebuild_hint())
        for name, host in results.items():
            cuda.check(cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name].ptr, host.nbytes, d2h, self.stream),
                       "cudaMemcpyAsync")
        cuda.check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        # Copies out of the pinned buffers, which the next call reuses.
        return {n: from_bfloat16_bits(a) if a.dtype == np.uint16 else a.astype(np.float32 if a.dtype == np.float16 else a.dtype)
                for n, a in results.items()}

    def _bind(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise OsxError(f"{self.component}: TensorRT refused the device address of {name!r}", hint=self._rebuild_hint())

    def _rebuild_hint(self) -> str:
        return f"rebuild the engines on this machine ({rebuild_command(str(self.bundle.root))}), or run with --backend onnxruntime"

    # --- release ---------------------------------------------------------------------------------
    def release(self) -> None:
        """Free the device buffers, the execution context (activation memory) and the engine (weights)."""
        for b in (*self.buffers.values(), *self.pinned.values()):
            b.free()
        self.buffers.clear()
        self.pinned.clear()
        if self.stream is not None:
            cuda.check(self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
        self.context = self.engine = self.runtime = self.stream = None
        self.active_profile = self.weight_streaming = None

    def __enter__(self) -> "TrtBackend":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.release()
