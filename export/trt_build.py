"""The TensorRT calls of one engine build: parse an ONNX file into a strongly typed network, configure
(profiles, workspace, compatibility, timing cache, progress), build, serialize.

Only API present in both TensorRT 10.8+ and 11 is used (tests/test_trt_contract.py holds stand-ins that
expose each version's surface): no precision builder flags (removed in 11; the graph carries the types),
the STRONGLY_TYPED creation flag (required on 10.x, accepted and ignored on 11), the tensor-name API.
TensorRT is called directly rather than through polygraphy's loaders so that a parser or builder failure
becomes an OsxError naming the component, the node and a hint, and a timing cache written by another
TensorRT or GPU is reported instead of silently replaced.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from osx.errors import OsxError


@dataclass
class BuildRequest:
    component: str
    onnx_path: Path
    profiles: list[dict[str, tuple[tuple[int, ...], ...]]]  # per profile: {input: (min, opt, max)}
    workspace_bytes: int
    portable: bool
    timing_cache: Path | None = None
    progress: bool = True
    notes: list[str] = field(default_factory=list)  # what the build reported (timing cache, warnings)
    weight_streaming: bool = False  # a streamable engine: the runtime keeps part of its weights in host memory


def _logger(trt):
    """A TensorRT logger that prints warnings and keeps errors for the OsxError a failure raises."""

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return Log()


def _progress_monitor(trt, label: str):
    """A TensorRT IProgressMonitor drawing one tqdm bar per build phase."""
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


def parse_errors(parser, component: str, source: str) -> OsxError:
    """The parser's errors as one OsxError naming each failing node and operator."""
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() or f"#{e.node()}"
        lines.append(f"node {node} ({e.node_operator() or '?'}): {e.desc()}")
    return OsxError(f"{component}: TensorRT's ONNX parser rejected {source}:\n  " + "\n  ".join(lines[:10] or ["(no detail)"]),
                    hint="run `osx build BUNDLE --dry-run` for the TensorRT lint of every node; an unsupported op or "
                         "type needs a re-export (see README, TensorRT lint)")


def build_engine(trt, req: BuildRequest) -> tuple[bytes, bytes | None]:
    """(serialized engine, serialized timing cache). Raises OsxError on any failure."""
    log = _logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(req.onnx_path)):  # from the file: external weights are found beside it
        raise parse_errors(parser, req.component, req.onnx_path.name)

    config = builder.create_builder_config()
    if req.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, req.workspace_bytes)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 graphs stay exact fp32
    for shapes in req.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        if config.add_optimization_profile(profile) < 0:
            raise OsxError(f"{req.component}: TensorRT refused optimisation profile {shapes}", hint="check the profile TOML's buckets")
    if req.portable:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)  # the plan embeds its lean runtime
    if req.weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)  # needs a strongly typed network: every one of ours is
    if req.progress:
        config.progress_monitor = _progress_monitor(trt, req.component)

    old = req.timing_cache.read_bytes() if req.timing_cache and req.timing_cache.is_file() else b""
    cache = config.create_timing_cache(old)
    if not config.set_timing_cache(cache, False):  # False: do not ignore a mismatch
        req.notes.append(f"timing cache {req.timing_cache} was written by another TensorRT version or GPU; starting a new one")
        print(f"{req.component}: {req.notes[-1]}", file=sys.stderr)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(log.errors[-5:]) or "no detail in the log"
        raise OsxError(f"{req.component}: TensorRT could not build an engine from {req.onnx_path.name}: {detail}",
                       hint="out of memory: close other GPU work or lower workspace_gib / the largest bucket in the "
                            "profile; an unsupported layer or type: see `osx build BUNDLE --dry-run`")
    written = config.get_timing_cache()
    return bytes(memoryview(serialized)), (bytes(memoryview(written.serialize())) if written is not None else None)
