"""Stand-in `tensorrt` and `cuda.bindings.runtime` modules exposing only the API surface of one TensorRT
version (10.x or 11.x) and of cuda-python, for contract tests of the calls osx makes.

Not a simulation of TensorRT: enums hold only the members the version has (TensorRT 11 lost
BuilderFlag.FP16 / BF16 / INT8 / FP8 / OBEY_PRECISION_CONSTRAINTS / DIRECT_IO and
ICudaEngine.device_memory_size: docs.nvidia.com, "Removed Python APIs and Replacements", 10.x -> 11.x),
so a removed call fails exactly as it would there; every call is recorded. A "plan" is JSON naming the
ONNX graph and the build settings; the execution context runs that graph's fp32 original on onnxruntime
so outputs can be compared through the backend's transport (pinned buffers, dtypes, profiles).
"Device" memory is host memory reached through its address, as cuda-python's integer pointers are.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import re
import types
from pathlib import Path

import numpy as np
import onnx

BUILDER_FLAGS = {
    10: ["FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "TF32", "REFIT", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME",
         "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO", "STRIP_PLAN", "WEIGHT_STREAMING"],
    11: ["TF32", "REFIT", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "STRIP_PLAN", "WEIGHT_STREAMING"],
}
ONNX_TO_TRT = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
               onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32", onnx.TensorProto.BOOL: "BOOL"}


def make_tensorrt(version: str, calls: list, reject_ops: tuple[str, ...] = ()) -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch's import probes read it

    def record(*what):
        calls.append(what)

    class Severity(enum.IntEnum):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class ILogger:
        def __init__(self):
            pass

    ILogger.Severity = Severity

    class Logger(ILogger):
        WARNING = Severity.WARNING

        def __init__(self, severity=Severity.WARNING):
            super().__init__()

        def log(self, severity, msg):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    trt.ILogger, trt.Logger, trt.IProgressMonitor = ILogger, Logger, IProgressMonitor
    trt.BuilderFlag = enum.Enum("BuilderFlag", BUILDER_FLAGS[major])
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag", ["STRONGLY_TYPED"] if major >= 11 else ["EXPLICIT_BATCH", "STRONGLY_TYPED"], start=0)
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", ["WORKSPACE", "TACTIC_SHARED_MEMORY"])
    trt.HardwareCompatibilityLevel = enum.Enum("HardwareCompatibilityLevel", ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"])
    trt.DataType = enum.Enum("DataType", ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8"])

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs, self.outputs, self.path = flags, [], [], None

    class ParserError:
        def __init__(self, node, op, desc):
            self._node, self._op, self._desc = node, op, desc

        def node_name(self):
            return self._node

        def node_operator(self):
            return self._op

        def node(self):
            return 0

        def desc(self):
            return self._desc

        def code(self):
            return 8

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            record("parse_from_file", path)
            model = onnx.load(path, load_external_data=False)
            self.errors = [ParserError(n.name, n.op_type, "unsupported by this stand-in")
                           for n in model.graph.node if n.op_type in reject_ops]
            self.network.path = path
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = [list(lo), list(opt), list(hi)]

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return json.dumps({"tensorrt": version}).encode()

    class Config:
        def __init__(self):
            self.flags, self.profiles, self.pools, self.cache = set(), [], {}, None
            self.hardware_compatibility_level = trt.HardwareCompatibilityLevel.NONE
            self.progress_monitor = None

        def set_flag(self, flag):
            record("set_flag", flag.name)
            self.flags.add(flag.name)

        def clear_flag(self, flag):
            record("clear_flag", flag.name)
            self.flags.discard(flag.name)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool.name] = size

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            record("set_timing_cache", bool(ignore_mismatch))
            ok = not cache.data or json.loads(cache.data)["tensorrt"] == version
            self.cache = cache if ok or ignore_mismatch else None
            return ok

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            record("create_network", flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            strongly = bool(network.flags & (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            record("build", network.path, sorted(config.flags), strongly)
            plan = {"onnx": Path(network.path).name, "flags": sorted(config.flags), "strongly_typed": strongly,
                    "profiles": config.profiles, "hardware": config.hardware_compatibility_level.name, "version": version,
                    "streamable": _weight_bytes(network.path) if "WEIGHT_STREAMING" in config.flags else 0}
            return json.dumps(plan).encode()

    trt.Builder, trt.OnnxParser = Builder, OnnxParser

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses, self.outputs, self.profile = engine, {}, {}, None, None

        def set_optimization_profile_async(self, index, stream):
            self.profile = index
            return 0 <= index < len(self.engine.plan["profiles"])

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.plan["profiles"][self.profile][name]
            ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            self.shapes[name] = tuple(shape)
            self.outputs = None
            return ok

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return name in self.engine.names

        def _run(self):
            """The engine's graph, run at the bound inputs (copied in already: the backend copies before
            it asks for output shapes)."""
            import onnxruntime as ort

            inputs = {}
            for name, shape in self.shapes.items():
                dtype = self.engine.np_dtype(name)
                n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                inputs[name] = np.frombuffer(ctypes.string_at(self.addresses[name], n), dtype).reshape(shape)
            session = ort.InferenceSession(self.engine.fp32_graph, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            self.outputs = dict(zip(names, session.run(None, inputs)))

        def get_tensor_shape(self, name):
            if self.outputs is None:
                self._run()
            return self.outputs[name].shape

        def execute_async_v3(self, stream):
            record("execute_async_v3")
            for name, value in self.outputs.items():
                data = np.ascontiguousarray(value.astype(self.engine.np_dtype(name)))
                ctypes.memmove(self.addresses[name], data.ctypes.data, data.nbytes)
            return True

    class Engine:
        def __init__(self, plan):
            self.plan = plan
            graph = Path(trt.bundle_dir) / plan["onnx"]  # set by the test: the bundle being run
            self.fp32_graph = str(graph.with_name(re.sub(r"\.(fp16|bf16)\.onnx$", ".onnx", graph.name)))
            model = onnx.load(str(graph), load_external_data=False)
            self.types = {v.name: ONNX_TO_TRT[v.type.tensor_type.elem_type] for v in (*model.graph.input, *model.graph.output)}
            self.names = list(self.types)
            self.device_memory_size_v2 = 1 << 20
            self.streamable_weights_size = plan["streamable"]  # the graph's weight bytes when built streamable
            self._budget = plan["streamable"]  # TensorRT's default: every streamable weight on the card

        @property
        def weight_streaming_budget_v2(self):
            return self._budget

        @weight_streaming_budget_v2.setter
        def weight_streaming_budget_v2(self, value):
            """TensorRT logs an error and keeps the old budget for a non-streamable engine or one out of range."""
            record("weight_streaming_budget_v2", value)
            if self.streamable_weights_size and 0 <= value <= self.streamable_weights_size:
                self._budget = value

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, i):
            return self.names[i]

        def get_tensor_dtype(self, name):
            return trt.DataType[self.types[name]]

        def np_dtype(self, name):
            return np.dtype({"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT64": np.int64,
                             "INT32": np.int32, "BOOL": np.bool_}[self.types[name]])

        def create_execution_context(self):
            record("create_execution_context")
            return Context(self)

    if major < 11:
        Engine.device_memory_size = property(lambda self: self.device_memory_size_v2)

    class Runtime:
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, buffer):
            record("deserialize_cuda_engine", type(buffer).__name__)
            plan = json.loads(bytes(memoryview(buffer)))
            if plan["version"] != version and not plan["flags"].count("VERSION_COMPATIBLE"):
                return None
            return Engine(plan)

    trt.Runtime = Runtime
    return trt


def _weight_bytes(path: str) -> int:
    """Bytes of a graph's initializers (stored in the file or beside it): what a streamable engine may stream."""
    model = onnx.load(path, load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        external = {e.key: e.value for e in t.external_data}
        total += int(external["length"]) if "length" in external else len(t.raw_data)
    return total


def make_cudart(calls: list, driver: int = 12080, runtime: int = 12060, devices: dict[str, int] | None = None):
    """cuda-python's runtime module surface: (error, *values) tuples; memory at real host addresses."""
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.__spec__ = importlib.machinery.ModuleSpec("cuda.bindings.runtime", None)
    rt.cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidDevice": 101})
    rt.cudaMemcpyKind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
    ok = rt.cudaError_t.cudaSuccess
    blocks: dict[int, ctypes.Array] = {}
    devices = devices if devices is not None else {"0000:01:00.0": 0}

    def alloc(kind):
        def f(n):
            buf = ctypes.create_string_buffer(n)
            blocks[ctypes.addressof(buf)] = buf
            calls.append((kind, n))
            return ok, ctypes.addressof(buf)
        return f

    def free(kind):
        def f(ptr):
            calls.append((kind, ptr))
            del blocks[ptr]
            return (ok,)
        return f

    def memcpy(dst, src, n, kind, stream):
        calls.append(("cudaMemcpyAsync", kind.name))
        ctypes.memmove(dst, src, n)
        return (ok,)

    def by_bus_id(bus: bytes):
        calls.append(("cudaDeviceGetByPCIBusId", bus))
        device = devices.get(bus.decode())
        return (ok, device) if device is not None else (rt.cudaError_t.cudaErrorInvalidDevice, 0)

    rt.cudaMalloc, rt.cudaFree = alloc("cudaMalloc"), free("cudaFree")
    rt.cudaMallocHost, rt.cudaFreeHost = alloc("cudaMallocHost"), free("cudaFreeHost")
    rt.cudaMemcpyAsync = memcpy
    rt.cudaDeviceGetByPCIBusId = by_bus_id
    rt.cudaSetDevice = lambda d: (calls.append(("cudaSetDevice", d)), (ok,))[1]
    rt.cudaDriverGetVersion = lambda: (ok, driver)
    rt.cudaRuntimeGetVersion = lambda: (ok, runtime)
    rt.cudaStreamCreate = lambda: (ok, 7)
    rt.cudaStreamDestroy = lambda s: (ok,)
    rt.cudaStreamSynchronize = lambda s: (ok,)
    rt.blocks = blocks
    return rt


def install(monkeypatch, trt: types.ModuleType, rt: types.ModuleType) -> None:
    """Put the stand-ins where `import tensorrt` and `from cuda.bindings import runtime` find them."""
    import sys

    cuda_pkg, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    bindings.runtime, cuda_pkg.bindings = rt, bindings
    for m in (cuda_pkg, bindings):
        m.__spec__ = importlib.machinery.ModuleSpec(m.__name__, None)
    for name, module in (("tensorrt", trt), ("cuda", cuda_pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, module)


def plan_of(path: str | Path) -> dict:
    return json.loads(Path(path).read_bytes())


BUS_ID = "00000000:01:00.0"  # NVML's form; CUDA is asked for 0000:01:00.0


def activate(monkeypatch, version: str, bundle_dir, **cudart) -> tuple[list, types.ModuleType]:
    """Install the stand-ins for one TensorRT version, point osx at a machine (an RTX 4070) that has it, and let
    the stand-in's engines find their graphs in `bundle_dir` (the bundle being built and run). (calls, cudart)."""
    import osx.engine_key as compat
    import osx.export.engines as engines
    import osx.runtime.backend_trt as backend_trt
    from osx.engine_key import Machine

    calls: list = []
    trt, rt = make_tensorrt(version, calls), make_cudart(calls, **cudart)
    install(monkeypatch, trt, rt)
    machine = Machine("NVIDIA GeForce RTX 4070", (8, 9), {"tensorrt": version}, BUS_ID)
    for module in (engines, compat, backend_trt):
        monkeypatch.setattr(module, "this_machine", lambda: machine)
    trt.bundle_dir = str(bundle_dir)
    return calls, rt


def osx_build(bundle, profile: str) -> None:
    """`osx build BUNDLE --gpu PROFILE` in this process, which must succeed."""
    from osx.cli import main

    try:
        main(["build", str(bundle), "--gpu", profile])
    except SystemExit as e:  # main() exits only on errors
        assert e.code in (None, 0)
