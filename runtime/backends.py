"""Backends run one bundle component: NumPy arrays in, NumPy arrays out.

Interface (`Backend`), implemented by `OrtBackend` here, `osx.runtime.backend_trt.TrtBackend` and
`osx.runtime.backend_ov.OvBackend`:
    backend = cls(bundle, component, **options)   # cheap: nothing loaded yet
    backend.load()                                 # session / engine into memory
    outputs = backend.run({"x": ..., ...})         # names and dtypes as the component's io spec
    backend.release()                              # free it; load() may be called again
    backend.limits()                               # the shape profiles it runs: its engine's, or the io ranges
    backend.buckets()                              # (height, width, frames) its engine was built for, or []
    backend.load_one_at_a_time                     # its engine's plan says so; None: the manifest's runtime settings

Which class runs a component: the `backend` argument of `Pipeline.load` / `osx generate --backend`,
else the component's `backend` key in the manifest ("onnxruntime", "tensorrt", "openvino", ...). `BACKENDS` maps
each name to its class (imported only when used, so tensorrt is never imported for an ONNX bundle)
and the options it is built with.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Protocol

import numpy as np

from osx.bundle import Bundle
from osx.consistency import ORT_TYPES
from osx.engine_key import rebuild_command
from osx.errors import BundleError, OsxError

# name -> (module, class, constructor options)
BACKENDS: dict[str, tuple[str, str, dict]] = {
    "onnxruntime": ("osx.runtime.backends", "OrtBackend", {"providers": ("cpu",)}),
    "onnxruntime-cuda": ("osx.runtime.backends", "OrtBackend", {"providers": ("cuda", "cpu")}),
    "onnxruntime-tensorrt": ("osx.runtime.backends", "OrtBackend", {"providers": ("tensorrt", "cuda", "cpu")}),
    "tensorrt": ("osx.runtime.backend_trt", "TrtBackend", {}),
    # the `openvino` extra (osx.runtime.backend_ov): the denoiser at bf16 on AMX/AVX512-BF16 CPUs, or all fp32
    "openvino": ("osx.runtime.backend_ov", "OvBackend", {"precision": "bf16"}),
    "openvino-fp32": ("osx.runtime.backend_ov", "OvBackend", {"precision": "fp32"}),
}

# onnxruntime session settings, in one place (each measured by `scripts/bench.py runtime`, README "Benchmarks"):
# - intra-op threads: one per physical core this process may run on (`physical_cores`); a single inter-op
#   thread and sequential execution: these graphs are one long chain of big ops.
# - the CPU memory arena on: without it every op's output is a fresh malloc/free and the denoiser step is
#   1.1-1.2x slower; the cost is peak RSS (the arena keeps its largest allocations for the session's life).
# - no spinning: idle worker threads sleep instead of busy-waiting for the next op, which on a shared or
#   oversubscribed machine steals the cores the other threads need.
ORT_SESSION = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "execution_mode": "ORT_SEQUENTIAL",
    "inter_op_num_threads": 1,
    "enable_mem_pattern": True,
    "enable_cpu_mem_arena": True,
    "log_severity_level": 3,  # errors only
}
ORT_CONFIG = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class Backend(Protocol):
    name: str  # the component

    def load(self) -> None: ...

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def release(self) -> None: ...

    @property
    def loaded(self) -> bool: ...

    def limits(self) -> list[dict]: ...

    def buckets(self) -> list[tuple[int, int, int]]: ...


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads of one core count once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topo}/physical_package_id") as pkg, open(f"{topo}/core_id") as core:
                cores.add((pkg.read().strip(), core.read().strip()))
        except OSError:  # no sysfs topology (not Linux): count logical CPUs
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def session_options(threads: int | None = None):
    """onnxruntime SessionOptions as the runtime uses them (ORT_SESSION, ORT_CONFIG); `threads` intra-op
    threads, default one per physical core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in ORT_SESSION.items():
        if key == "graph_optimization_level":
            value = getattr(ort.GraphOptimizationLevel, value)
        elif key == "execution_mode":
            value = getattr(ort.ExecutionMode, value)
        setattr(options, key, value)
    for key, value in ORT_CONFIG.items():
        options.add_session_config_entry(key, value)
    options.intra_op_num_threads = threads or physical_cores()
    return options


AUTO = "auto"  # a backend name too: osx picks per component (auto_backend)


def auto_backend(bundle: Bundle, component: str) -> str:
    """What `auto` runs `component` with: OpenVINO at bf16 for the fp32 denoiser of an Open-Sora v1.2 CPU bundle
    (one the manifest gives onnxruntime) where the `openvino` extra is installed and the CPU computes bf16 natively
    (AMX / AVX512-BF16), the fastest CPU backend measured that passed the quality gate (README "Benchmarks");
    everything else as the manifest says (onnxruntime on the CPU, TensorRT engines on a GPU plan)."""
    meta = bundle.components[component]
    if (component, meta.backend, meta.precision, bundle.manifest.model.get("family")) != \
            ("denoiser", "onnxruntime", "fp32", "opensora-v1.2"):
        return meta.backend
    return "openvino" if openvino_has_native_bf16() else meta.backend


@functools.cache
def openvino_has_native_bf16() -> bool:
    """The `openvino` extra is installed and OpenVINO lists BF16 among this CPU's capabilities."""
    if importlib.util.find_spec("openvino") is None:
        return False
    try:
        import openvino as ov

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # a broken install or no CPU plugin: onnxruntime it is
        return False


def create_backend(bundle: Bundle, component: str, backend: str | None = None) -> Backend:
    """The backend for `component`: `backend` if given ("auto": `auto_backend`), else the manifest's choice."""
    name = backend or bundle.components[component].backend
    if name == AUTO:
        name = auto_backend(bundle, component)
    if name not in BACKENDS:
        raise OsxError(f"unknown backend {name!r} for {component}", hint=f"choose one of {', '.join([*BACKENDS, AUTO])}")
    if name == "tensorrt" and not bundle.components[component].engines:  # fail at open, not at generate
        raise BundleError(f"{bundle.root}: {component} has no TensorRT engine in this bundle",
                          hint=f"build them on the machine with the GPU: {rebuild_command(str(bundle.root))}; "
                          "or run the ONNX graphs with --backend onnxruntime")
    module, cls, options = BACKENDS[name]
    try:
        backend_cls = getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise OsxError(f"backend {name!r} is not available: {e}",
                       hint='install it from the osx clone (pip install -e ".[tensorrt]" for TensorRT, '
                       '".[openvino]" for OpenVINO) or pass --backend onnxruntime') from None
    return backend_cls(bundle, component, **options)


class OrtBackend:
    """onnxruntime InferenceSession for the component's ONNX file (external data beside it): the graph
    fused for onnxruntime at export ("onnxruntime_file", osx.export.ort_optimize) where the bundle has
    one, except under TensorRT's provider, which does not parse its com.microsoft operators."""

    def __init__(self, bundle: Bundle, component: str, providers: tuple[str, ...] = ("cpu",), threads: int | None = None):
        meta = bundle.components[component]
        self.name = component
        fused = meta.onnxruntime_file if "tensorrt" not in providers else None
        self.path = bundle.path(fused or meta.file)
        if self.path.suffix != ".onnx":
            raise BundleError(f"{component}: {meta.file} is not an ONNX file", hint="this component needs --backend tensorrt")
        self.spec = bundle.spec(component)
        self.providers = [ORT_PROVIDERS[p] for p in providers]
        self.threads = threads
        self.session = None
        self.checked_shapes = None  # the input shapes of the last call that passed the spec's checks
        # float inputs go in at the exported precision; ints as the spec says
        self.dtypes = {t.name: np.dtype(self.spec.dtype_of(t)) for t in self.spec.inputs}

    load_one_at_a_time = None  # the manifest's runtime settings decide

    @property
    def loaded(self) -> bool:
        return self.session is not None

    def limits(self) -> list[dict]:
        return [self.spec.dims]

    def buckets(self) -> list[tuple[int, int, int]]:
        return []

    def load(self) -> None:
        if self.session is not None:
            return
        import onnxruntime as ort

        missing = [p for p in self.providers if p not in ort.get_available_providers()]
        if missing:
            raise OsxError(f"onnxruntime here lacks {', '.join(missing)}",
                           hint=f"available: {', '.join(ort.get_available_providers())}; install onnxruntime-gpu "
                           "for CUDA/TensorRT, or use --backend onnxruntime (CPU)")
        options = session_options(self.threads)
        try:
            session = ort.InferenceSession(os.fspath(self.path), options, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise BundleError(f"onnxruntime cannot load {self.path.name} ({self.name}): {e}",
                              hint="the bundle may be corrupt (osx bundle verify) or need a newer onnxruntime") from None
        names = ({i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()})
        want = ({t.name for t in self.spec.inputs}, {t.name for t in self.spec.outputs})
        if names != want:
            raise BundleError(f"{self.path.name} has inputs/outputs {names}, the manifest says {want}",
                              hint="the bundle is inconsistent; re-export it")
        for i in session.get_inputs():  # an edited dtype: say so here, not as a failed run with a memory hint
            if ORT_TYPES.get(i.type) != self.dtypes[i.name].name:
                raise BundleError(f"{self.path.name}: input {i.name!r} is {i.type} in the graph, the manifest says "
                                  f"{self.dtypes[i.name].name}", hint="the bundle is inconsistent; re-export it")
        self.session = session
        self.output_names = [t.name for t in self.spec.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            self.load()
        feed = {name: np.ascontiguousarray(inputs[name], dtype=dtype) for name, dtype in self.dtypes.items()
                if name in inputs}
        shapes = tuple((name, a.shape) for name, a in feed.items())
        if shapes != self.checked_shapes:  # the same shapes as the last call (every step of a run): checked already
            self.spec.check(self.spec.sizes_of(feed))  # names, ranks, fixed dims, ranges: a clear error, not ORT's
            self.checked_shapes = shapes
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as e:  # e.g. out of memory at a large shape
            raise OsxError(f"{self.name} failed in onnxruntime: {e}",
                           hint="try a smaller resolution or frame count, or a machine with more memory") from None
        return dict(zip(self.output_names, outputs))

    def release(self) -> None:
        self.session = None
