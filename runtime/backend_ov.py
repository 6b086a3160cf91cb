"""OpenVINO backend (the optional `openvino` extra): a component's ONNX graph compiled for the CPU.

Why a second CPU backend: on CPUs with AMX, torch's bf16 (the baseline Open-Sora users run) multiplies on
AMX tiles; onnxruntime has no bf16 CPU kernels, and its int8 loses to AMX bf16 as matrices grow (README
"Benchmarks", `bench.py gemm`). OpenVINO runs bf16 on AMX and fuses the attention and the elementwise work
around the matmuls itself, from the same portable ONNX graph (never the onnxruntime-fused one: its
com.microsoft operators are onnxruntime's own).

Precisions (`BACKENDS` in osx.runtime.backends):
- "openvino" (`precision="bf16"`): the denoiser at OpenVINO's bf16 inference precision where the CPU has
  native bf16 (AMX or AVX512-BF16: OpenVINO lists BF16 among its capabilities; elsewhere at fp32, `runs_at`
  says which), every other component at fp32
  (they run once per video: bf16 would buy nothing there). The products that feed a Sin/Cos (the
  sinusoidal timestep/fps embeddings and RoPE phases) stay fp32: in bf16 (8-bit mantissa) t * freq for
  t up to 1000 is off by several radians (measured on the bench model: relative L2 of the denoiser's
  output 0.20 at t=500 without this, 0.012 with it). Its quality verdict: `bench.py runtime` puts it
  through the INT8 quality gate's thresholds.
- "openvino-fp32": every component at fp32 (OpenVINO's f32 hint: no bf16 anywhere).

OpenVINO marks a node "keep fp32" only through its C++ runtime attribute, which Python cannot create; an
IR read back from XML can carry it (`<attribute name="precise" version="0"/>`), so the graph goes through
IR once, in a temporary folder, at load.
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openvino as ov  # here, not at load: a missing extra is reported when the backend is chosen

from osx.bundle import Bundle
from osx.errors import BundleError, OsxError
from osx.runtime.backends import physical_cores

PHASE_OPS = ("Sin", "Cos")
KEEP_FP32 = ("precise", "0")  # OpenVINO's runtime attribute DisableFP16Compression (also honoured for bf16)


class OvBackend:
    """An OpenVINO CompiledModel for one component, CPU device, `precision` "bf16" (the denoiser only) or "fp32"."""

    load_one_at_a_time = None  # the manifest's runtime settings decide

    def __init__(self, bundle: Bundle, component: str, precision: str = "bf16", threads: int | None = None):
        meta = bundle.components[component]
        self.name = component
        self.path = bundle.path(meta.file)
        if self.path.suffix != ".onnx":
            raise BundleError(f"{component}: {meta.file} is not an ONNX file", hint="this component needs --backend tensorrt")
        self.spec = bundle.spec(component)
        self.precision = precision if component == "denoiser" else "fp32"
        self.threads = threads
        # the denoiser runs at one shape per video, dozens of times: compiled for that shape (static shapes:
        # 1.38x faster than OpenVINO's dynamic-shape kernels at 128 px on the bench model); the others dynamic
        self.static = component == "denoiser"
        self.model = self.core = self._tmp = self.runs_at = None
        self.requests: dict = {}
        self.dtypes = {t.name: np.dtype(self.spec.dtype_of(t)) for t in self.spec.inputs}

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def limits(self) -> list[dict]:
        return [self.spec.dims]

    def buckets(self) -> list[tuple[int, int, int]]:
        return []

    def load(self) -> None:
        if self.model is not None:
            return
        self.core = ov.Core()
        # bf16 only where the CPU computes it natively (OpenVINO reports BF16 then); fp32 elsewhere
        native = "BF16" in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.runs_at = "bf16" if self.precision == "bf16" and native else "fp32"
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if self.runs_at == "bf16" else "f32",
                       "INFERENCE_NUM_THREADS": self.threads or physical_cores(), "NUM_STREAMS": 1,
                       "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}  # pinning hurts on shared cores
        # the marked IR's weights stay memory-mapped from here until release()
        self._tmp = tempfile.TemporaryDirectory(prefix="osx-openvino-", ignore_cleanup_errors=True)
        try:
            model = self.core.read_model(os.fspath(self.path))
            if self.runs_at == "bf16":
                model = keep_phases_fp32(self.core, model, Path(self._tmp.name))
            names = ({i.get_any_name() for i in model.inputs}, {o.get_any_name() for o in model.outputs})
        except Exception as e:  # OpenVINO raises RuntimeError for graphs it cannot read
            self.release()
            raise BundleError(f"OpenVINO cannot load {self.path.name} ({self.name}): {e}",
                              hint="run this bundle with --backend onnxruntime, or update openvino") from None
        want = ({t.name for t in self.spec.inputs}, {t.name for t in self.spec.outputs})
        if names != want:
            self.release()
            raise BundleError(f"{self.path.name} has inputs/outputs {names}, the manifest says {want}",
                              hint="the bundle is inconsistent; re-export it")
        self.model = model
        self.output_names = [t.name for t in self.spec.outputs]

    def _request(self, feed: dict[str, np.ndarray]):
        """The infer request for these inputs' shapes (static) or the one dynamic one, compiled on first use."""
        key = tuple((name, a.shape) for name, a in feed.items()) if self.static else None
        if key not in self.requests:
            if self.static:
                self.requests.clear()  # one shape at a time: each compiled model holds its own weights
                self.model.reshape({name: ov.PartialShape(list(a.shape)) for name, a in feed.items()})
            # OpenVINO 2026.4's snippets (its JIT for fused elementwise/attention subgraphs) computed the
            # static-shape denoiser wrong (tiny model: 0.12 relative error, 4e-6 without them); off they cost
            # nothing measurable here (static without snippets: 0.395 -> 0.287 s vs dynamic at 128 px)
            config = {**self.config, "SNIPPETS_MODE": "DISABLE"} if self.static else self.config
            compiled = self.core.compile_model(self.model, "CPU", config)
            self.requests[key] = compiled.create_infer_request()
        return self.requests[key]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is None:
            self.load()
        feed = {name: np.ascontiguousarray(inputs[name], dtype=dtype) for name, dtype in self.dtypes.items()
                if name in inputs}
        self.spec.check(self.spec.sizes_of(feed))  # names, ranks, fixed dims, ranges: a clear error, not OpenVINO's
        try:
            request = self._request(feed)
            request.infer(feed)
        except Exception as e:  # e.g. out of memory at a large shape
            raise OsxError(f"{self.name} failed in OpenVINO: {e}",
                           hint="try a smaller resolution or frame count, or --backend onnxruntime") from None
        return {name: request.get_tensor(name).data.copy() for name in self.output_names}

    def release(self) -> None:
        self.model = self.core = None
        self.requests = {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def keep_phases_fp32(core, model, tmp: Path):
    """`model` with the node feeding each Sin/Cos marked to stay fp32 under a bf16 inference precision
    (see the module's docstring: written as IR, the attribute added to those layers, read back)."""
    names = {op.input_value(0).get_node().get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() in PHASE_OPS}
    if not names:
        return model
    xml = tmp / "model.xml"
    ov.save_model(model, xml, compress_to_fp16=False)
    tree = ET.parse(xml)
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in names:
            info = layer.find("rt_info")
            if info is None:
                info = ET.Element("rt_info")
                layer.insert(0, info)
            ET.SubElement(info, "attribute", name=KEEP_FP32[0], version=KEEP_FP32[1])
            marked += 1
    if marked != len(names):  # a layer renamed on the way: say so rather than run a wrong bf16 graph
        raise OsxError(f"OpenVINO: {len(names) - marked} of the {len(names)} Sin/Cos inputs not found in the IR",
                       hint="this openvino version writes IR differently; use --backend openvino-fp32")
    tree.write(xml)
    return core.read_model(os.fspath(xml))
