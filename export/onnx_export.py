"""One component (a torch module + its ComponentSpec) -> one cleaned, checked ONNX file.

Exporter choice: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript), not the TorchScript
tracer. Both export the components with dynamic shapes and both validate in torch 2.13; measured here:
- graph: the tiny denoiser is 747 nodes before clean-up against the tracer's 1,740 (715 vs 859 after
  onnxslim); a shape the dynamo path cannot keep symbolic is an error (or a recorded assertion, see
  `trace`), where the tracer silently bakes the traced size into the graph;
- memory: exporting 1.07 GB of fp32 weights peaks at 1.44 GB with dynamo, 4.44 GB with the tracer. The
  dynamo graph's initializers are references to the torch parameters (weight transposes are folded as
  numpy views) and saving streams them one at a time into the external data file; the tracer first
  serialises every weight into a protobuf. This is what lets the 4.7B-parameter T5-XXL export without
  two fp32 copies in memory;
- speed is the tracer's one advantage (the tiny denoiser in 4 s against ~20 s).

Opset 18-20: what onnxruntime 1.32 and TensorRT 10 both parse (at opset >= 23 SDPA becomes the ONNX
`Attention` op, which onnxruntime rejects with a key-padding mask).

Memory (README "Exporting a real checkpoint"): the module is cast in place to the export dtype (no
second copy); the raw export streams weights into `<name>.onnx.data`; clean-up (onnxslim: constant
folding, shape inference, dead-node elimination, fusions) runs with the external weights left on disk
(`_slim_without_loading_weights`); the checker (and, streamed, the weights check) reads the graph with
its weights still in the data file. Weights at most `external_data_threshold` (osx.bundle.EXTERNAL_DATA_BYTES)
are then written into one self-contained `.onnx`, one tensor at a time (`_save_with_weights_inside`).
"""

from __future__ import annotations

import ast
import contextlib
import gc
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import onnxslim
import torch

from osx.bundle import EXTERNAL_DATA_BYTES
from osx.components import ComponentSpec
from osx.export.request import OPSETS
from osx.numeric import format_bytes

DTYPES = {"fp32": ("float32", torch.float32), "fp16": ("float16", torch.float16), "bf16": ("bfloat16", torch.bfloat16)}
EXPORTER = f"torch.export + torch.onnx.export(dynamo=True), torch {torch.__version__}"


@dataclass
class ExportInfo:
    """What export_component wrote; goes into the manifest's component entry."""

    component: str
    file: str  # the .onnx file name (beside it: data_file, if any)
    data_file: str | None
    precision: str  # "fp32" | "fp16"
    opset: int
    exporter: str
    cleanup: str
    trace_sizes: dict[str, int]
    op_counts: dict[str, int]
    nodes: int
    bytes: int  # .onnx + .data
    seconds: float
    notes: list[str] = field(default_factory=list)
    weights_check: dict | None = None  # streamed exports: initializers checked against the checkpoint

    def to_dict(self) -> dict:
        return asdict(self)


class SpecModule(torch.nn.Module):
    """Calls a component's torch module with the spec's inputs (in spec order) and returns exactly the
    spec's outputs, so the exported graph's signature is the spec's.

    `adapter`: a family's forward adapter (osx.families.Family.forward_adapter, resolved): (component name,
    module) -> the callable that takes the spec's inputs. Without one, the Open-Sora v1.2 modules' own
    signatures: STDiT3 returns 8 channels of which the denoiser spec keeps the first `in_channels` (the 4
    "sigma" channels are unused at inference); the VAE exports one chunk each way; any other spec name
    calls `module(*inputs)`.
    """

    def __init__(self, module: torch.nn.Module, spec: ComponentSpec, adapter: Callable | None = None):
        super().__init__()
        self.module = module
        self.spec = spec
        # set past nn.Module's registration: an adapter may return the module itself, which must not be
        # registered a second time (its weights would get a second name)
        object.__setattr__(self, "call", adapter(spec.name, module) if adapter is not None else None)

    def forward(self, *inputs: torch.Tensor):
        m, name = self.module, self.spec.name
        if self.call is not None:
            return self.call(*inputs)
        if name == "denoiser":
            return m(*inputs)[:, : self.spec.outputs[0].shape[1]]
        if name == "vae_decoder" and hasattr(m, "decode_chunk"):
            return m.decode_chunk(*inputs)
        if name == "vae_encoder" and hasattr(m, "encode_chunk"):
            return m.encode_chunk(*inputs)
        return m(*inputs)


def default_trace_sizes(spec: ComponentSpec) -> dict[str, int]:
    """Sizes for the example inputs used while tracing: each dim's opt, but at least 2 where the range
    allows, because torch.export specialises a dimension traced at size 0 or 1 into a constant."""
    return {d: max(r.opt, min(2, r.max)) for d, r in spec.dims.items()}


def dynamic_shapes(spec: ComponentSpec) -> tuple[dict[int, object], ...]:
    """torch.export dynamic shapes for the spec's inputs: one Dim per dimension name with the spec's
    min/max (the same Dim object wherever the name recurs). A multiple `k*name` gets its own Dim over
    k*min..k*max rather than torch's derived dim k*Dim: with a derived dim whose root is no input
    dimension, torch 2.13 fails while reporting the guards (`Cannot create Dim with inconsistent
    min=0, max=-4`). The multiple-of-k rule is the spec's, checked by `ComponentSpec.sizes_of`."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                k, name = (int(d.split("*")[0]), d.split("*")[1]) if "*" in d else (1, d)
                r = spec.dims[name]
                key = _dim_name(d)
                axes[i] = dims.setdefault(key, torch.export.Dim(key, min=k * r.min, max=k * r.max))
        shapes.append(axes)
    return tuple(shapes)


def _dim_name(d: str) -> str:
    """torch.export.Dim name of a spec dim: "8*latent_height" -> "latent_height_x8" (Dim names must be
    identifiers; the ONNX file uses ComponentSpec.dynamic_axes() names, set by `_name_io_dims`)."""
    return d if "*" not in d else "{1}_x{0}".format(*d.split("*"))


def torch_inputs(spec: ComponentSpec, sizes: dict[str, int], seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    arrays = spec.sample_inputs(sizes, seed=seed)
    return tuple(torch.from_numpy(arrays[t.name]).to(device) for t in spec.inputs)


def trace(wrapper: SpecModule, spec: ComponentSpec, sizes: dict[str, int]) -> tuple[torch.export.ExportedProgram, list[str]]:
    """torch.export the wrapper over the spec's full dynamic ranges. Returns the program and the shape
    assertions torch.export could not prove for every size in the ranges (see below).

    Called directly rather than through torch.onnx.export's capture, because that one retries a failed
    capture with torch's *suggested* dims (e.g. latent_height = 2*_latent_height), which silently
    narrows what the ONNX file accepts. Two settings instead, as torch.onnx uses for the first try:
    `backed_size_oblivious` (no 0/1 specialisation, so min=1 stays dynamic) and deferred runtime
    asserts in place of guards. The latter matters for code like `x.transpose(1, 2).reshape(...)`:
    torch must know whether the reshape can be a view (it can when T == 1) and guards `T != 1`; ONNX
    Reshape has no views, so the graph is right at T == 1 too, but the export would refuse. The
    asserts are dropped from the ONNX graph and returned here (they go into the manifest notes); that
    the graph is right anyway is then shown by validation, which always runs at each dim's minimum.
    """
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(
            wrapper,
            torch_inputs(spec, sizes, device=next(wrapper.parameters()).device.type),
            dynamic_shapes=(dynamic_shapes(spec),),  # one entry: SpecModule.forward(*inputs)
            strict=False,
            prefer_deferred_runtime_asserts_over_guards=True,
        )
    # Name torch's shape symbols (s27) after the spec's dims so the notes are readable.
    symbols = {}
    user_inputs = [n for n in program.graph.nodes if n.op == "placeholder"][-len(spec.inputs):]
    for node, t in zip(user_inputs, spec.inputs):
        for size, d in zip(node.meta["val"].shape, t.shape):
            if isinstance(size, torch.SymInt) and isinstance(d, str):
                symbols[str(size)] = _dim_name(d)
    asserts = set()
    for n in program.graph.nodes:
        if n.target is torch.ops.aten._assert_scalar.default:
            expr = str(n.args[1]).removeprefix("Runtime assertion failed for expression ").split(" on node")[0]
            asserts.add(re.sub(r"\bs\d+\b", lambda m: symbols.get(m.group(0), m.group(0)), expr))
    return program, sorted(asserts)


def export_component(
    module: torch.nn.Module,
    spec: ComponentSpec,
    path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int = 18,
    sample_sizes: dict[str, int] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_BYTES,
    progress: Callable[[str], None] | None = None,
    adapter: Callable | None = None,
) -> ExportInfo:
    """Export `module` as `spec` to `path` (an .onnx file; `<path>.data` beside it if the weights are
    over `external_data_threshold` bytes). The module is cast in place to `dtype` and put in eval mode.

    Runs torch.onnx.export with the spec's names and dynamic ranges, cleans the graph with onnxslim,
    names the graph's symbolic dims as the spec does, and checks the file with
    onnx.checker.check_model(full_check=True). Returns what was written (op counts included).
    `export_streamed` does the same from a checkpoint without the weights in memory.
    """
    _check_args(dtype, opset)
    module.to(DTYPES[dtype][1]).eval()
    return _export(module, spec, path, dtype, opset, sample_sizes, external_data_threshold, progress, adapter=adapter)[0]


def export_streamed(
    weights,
    spec: ComponentSpec,
    path: str | os.PathLike,
    *,
    dtype: str = "fp32",
    opset: int = 18,
    sample_sizes: dict[str, int] | None = None,
    external_data_threshold: int = EXTERNAL_DATA_BYTES,
    progress: Callable[[str], None] | None = None,
    adapter: Callable | None = None,
    check_weights: bool = True,
    repeat=None,
) -> ExportInfo:
    """`export_component` for an `osx.export.stream.Weights` (a module on the meta device + its
    checkpoint): traced without weights, each initializer streamed from the checkpoint and cast to
    `dtype` as it is written, then every one checked against its checkpoint tensor (sha256) unless
    `check_weights` is False (a graph that is then compared with PyTorch built from the same checkpoint).
    `repeat` (an osx.export.repeat.Repeat): trace its module, a cut of the model with a few blocks, and repeat
    the last block up to the full depth of `weights`'s module (a cost independent of depth)."""
    _check_args(dtype, opset)
    module = (repeat.module if repeat else weights.module).to(DTYPES[dtype][1])
    return _export(module, spec, path, dtype, opset, sample_sizes, external_data_threshold, progress, weights,
                   adapter, check_weights, repeat)[0]


def _check_args(dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS} (onnxruntime and TensorRT both parse these), got {opset}")


def _export(module, spec, path, dtype, opset, sample_sizes, external_data_threshold, progress,
            weights=None, adapter=None, check_weights=True, repeat=None) -> tuple[ExportInfo, dict | None]:
    """The export steps both entry points share; with `weights`, initializers are streamed and then checked
    against their checkpoint tensors (info.weights_check; the map of initializer -> checkpoint key is
    returned beside the info)."""
    say = progress or (lambda msg: None)
    path = Path(path)
    start = time.perf_counter()
    spec = spec.with_precision(DTYPES[dtype][0])
    sizes = {**default_trace_sizes(spec), **(sample_sizes or {})}
    sources = None

    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}-raw-", dir=path.parent))
    try:
        raw = scratch / path.name  # same file name, so the external data locations stay valid
        say(f"tracing {spec.name} ({dtype}, opset {opset}{', weights streamed from the checkpoint' if weights else ''}) "
            f"at {_fmt_sizes(sizes)}")
        with torch.no_grad(), _quiet():
            program, dropped = trace(SpecModule(module, spec, adapter), spec, sizes)
            names = dict(input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs])
            if weights is None:
                torch.onnx.export(program, (), raw, opset_version=opset, **names,
                                  external_data=True,  # stream weights to <raw>.data; the final layout is decided below
                                  optimize=True,  # constant folding (weight transposes as views) and onnxscript's rewrites
                                  verbose=False)
            else:
                from osx.export.stream import stream_initializers

                onnx_program = torch.onnx.export(program, (), None, opset_version=opset, **names, optimize=False, verbose=False)
                if repeat is not None:
                    say(f"repeating the traced blocks to full depth ({repeat.apply(onnx_program.model.graph)} copies)")
                sources = stream_initializers(onnx_program.model, weights)
                with _without_slices_split() if repeat is not None else contextlib.nullcontext():
                    onnx_program.optimize()  # what optimize=True runs, now over lazy initializers
                say(f"writing {spec.name}'s initializers from the checkpoint")
                onnx_program.save(raw, external_data=True)
                del onnx_program
            del program
            _forget_exported_graph()
        raw_data = Path(f"{raw}.data")
        weight_bytes = raw_data.stat().st_size if raw_data.exists() else 0
        external = weight_bytes > external_data_threshold

        say(f"cleaning {spec.name} graph with onnxslim ({format_bytes(weight_bytes)} of weights"
            f"{', kept as external data' if external else ''})")
        model = onnx.load(raw, load_external_data=False)
        _name_nodes_by_module(model)
        model = _slim_without_loading_weights(model)
        _name_io_dims(model, spec)
        # the checker reads the graph with its weights left in the data file (a self-contained copy would load
        # them all, twice); the file written below holds the same graph, and validation runs it
        onnx.save(model, raw)
        onnx.checker.check_model(str(raw), full_check=True)
        weights_check = None
        if weights is not None and check_weights:  # read back from the data file; the .onnx written below holds these bytes
            from osx.export.stream import check_initializers

            say(f"checking {path.name}'s initializers against the checkpoint (sha256, one at a time)")
            weights_check = check_initializers(raw, sources, weights)
        op_counts = dict(sorted(Counter(n.op_type for n in model.graph.node).items(), key=lambda kv: (-kv[1], kv[0])))
        nodes = len(model.graph.node)
        data_file = None
        if external:
            data_file = f"{path.name}.data"
            os.replace(raw_data, path.parent / data_file)
            os.replace(raw, path)
        else:
            _save_with_weights_inside(model, scratch, path)
        del model
    except BaseException:
        for p in (path, path.parent / f"{path.name}.data"):
            p.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    size = path.stat().st_size + ((path.parent / data_file).stat().st_size if data_file else 0)
    info = ExportInfo(
        component=spec.name,
        file=path.name,
        data_file=data_file,
        precision=dtype,
        opset=opset,
        exporter=EXPORTER,
        cleanup=f"onnxslim {onnxslim.__version__}",
        trace_sizes=sizes,
        op_counts=op_counts,
        nodes=nodes,
        bytes=size,
        seconds=round(time.perf_counter() - start, 2),
        weights_check=weights_check,
        notes=[f"torch.export shape assertion not kept in the graph (validation covers it): {a}" for a in dropped],
    )
    say(f"wrote {path.name}{' + ' + data_file if data_file else ''} ({format_bytes(size)}, {info.nodes} nodes, "
        f"checker ok) in {info.seconds:.1f}s")
    return info, sources


def _save_with_weights_inside(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    """`model` (external initializers in `folder`) written to `path` as one self-contained file, one weight
    at a time: a protobuf message may be written in parts (an embedded message field that recurs is merged,
    a repeated field appended), so the file is the graph without initializers followed by one
    `graph { initializer }` part per initializer, in their order. Parsers read it as the one model;
    serialising the loaded model instead would hold the weights twice (measured on the 0.82 GB VAE
    decoder: 2.6 GB above the export's own memory)."""
    inits = list(model.graph.initializer)
    del model.graph.initializer[:]
    try:
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
            for init in inits:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(init)
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    onnx.external_data_helper.load_external_data_for_tensor(tensor, str(folder))
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    del tensor.external_data[:]
                f.write(onnx.ModelProto(graph=onnx.GraphProto(initializer=[tensor])).SerializeToString())
                del tensor
    finally:
        model.graph.initializer.extend(inits)


def _name_nodes_by_module(model: onnx.ModelProto) -> None:
    """Prefix each node's name with the torch module it came from, '/spatial_blocks/0/attn/qkv/node_MatMul_7'
    (the TorchScript exporter's convention). The dynamo exporter records the module in node metadata,
    which onnxslim drops; names survive it. Calibration groups quantizable nodes into layers by it
    (osx.calibration.quantize.layer_groups), and TensorRT layer names and profiles read better."""
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "[]")
        scopes = ast.literal_eval(scopes)  # cumulative: ['', 'blocks.0', 'blocks.0.attn', 'linear']
        if len(scopes) >= 2 and scopes[-2]:
            node.name = "/" + scopes[-2].replace(".", "/") + "/" + node.name


@contextlib.contextmanager
def _without_slices_split():
    """onnxscript's optimizer without its SlicesSplit rule (two Slices of one tensor -> one Split), for a graph
    of repeated blocks. The rule has two output nodes, and onnxscript matches those by scanning the whole graph
    for every Slice: quadratic in depth (the real STDiT3's 28 blocks: over 6 minutes). It fuses nothing in
    the STDiT3 (its export has no Split; tests/test_repeat.py compares with the full trace, which runs it)."""
    from onnxscript import rewriter

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:  # a private name: an onnxscript without it optimizes as it does (slower, same graph)
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in rules if getattr(r, "name", None) != "SlicesSplit")
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules


def _forget_exported_graph() -> None:
    """Let the exported module's weights be freed once the caller drops the module.

    onnxscript's rewrite rules (run by the exporter's optimize step) are module-level objects whose
    pattern matchers keep the last graph they matched (`_graph`, `_current_node`, `_match`, `_tracer`);
    that graph's initializers are the torch weights, so without this the weights of the last exported
    component stay resident (measured: 0.75 GB of 0.75 GB on a 4-block STDiT3). Their state is reset
    as a new match would reset it. (Skipping the rewrites is no way out: they also remove the zero bias
    torchlib gives a bias-free Conv3d, whose shape [C, 2] onnxruntime rejects.)
    """
    from onnxscript.rewriter._matcher import PatternMatcher

    for obj in gc.get_objects():
        # type(), not isinstance: PatternMatcher is an ABC, whose isinstance reads obj.__class__, and some
        # objects a caller may hold raise on that (an open np.load(...npz)'s attribute bag: AttributeError)
        if issubclass(type(obj), PatternMatcher):
            obj._init_match(0)
            obj.__dict__.pop("_graph", None)
            obj.__dict__.pop("_tracer", None)
    gc.collect()


def _slim_without_loading_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim (constant folding, shape inference, dead-node elimination, fusions) on a graph whose
    large weights stay in the external data file.

    onnxslim reads every constant's values, so a graph loaded without its external data fails, and a
    graph loaded with it costs about two copies of the weights while slimming. The external weights
    are therefore handed to onnxslim as graph inputs of the same type and shape (values unknown: they
    are not folded - after the exporter has already folded the weight transposes there is nothing
    left to fold in them) and put back as the same external initializers afterwards. Measured on the
    tiny denoiser: 711 nodes this way against 710 slimming with the weights in memory.
    """
    external = {t.name: t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    for t in external.values():
        model.graph.initializer.remove(t)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in external.values())
    with _quiet(), _graph_inputs_found_by_identity():
        model = onnxslim.slim(model)
    used = {name for node in model.graph.node for name in node.input}
    for value in [v for v in model.graph.input if v.name in external]:
        model.graph.input.remove(value)
        if value.name in used:
            model.graph.initializer.append(external[value.name])
    return model


@contextlib.contextmanager
def _graph_inputs_found_by_identity():
    """onnxslim's graph clean-up asks, for every graph input, whether it is in the list of used tensors, a
    linear search comparing names, inputs and outputs: with the weights as graph inputs (above) that is
    quadratic in depth (the real STDiT3: minutes per clean-up). The list is given a set of its members'
    identities to look in first; a tensor not found there is still searched for as before."""
    from onnxslim.third_party.onnx_graphsurgeon.ir.graph import Graph

    class Members(list):
        def __init__(self, tensors):
            super().__init__(tensors)
            self.ids = {id(t) for t in tensors}

        def __contains__(self, tensor):
            return id(tensor) in self.ids or super().__contains__(tensor)

    used = getattr(Graph, "_get_used_node_ids", None)
    if used is None:  # a private name: an onnxslim without it cleans up as it does (slower, same graph)
        yield
        return

    def get_used_node_ids(self):
        node_ids, tensors = used(self)
        return node_ids, Members(tensors)

    Graph._get_used_node_ids = get_used_node_ids
    try:
        yield
    finally:
        Graph._get_used_node_ids = used


def _name_io_dims(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Give the graph's inputs and outputs the spec's dim names (the exporter writes derived output
    dims as sympy expressions such as `((latent_height + Mod(latent_height, 2))//2)`)."""
    axes = spec.dynamic_axes()
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for i, name in axes.get(value.name, {}).items():
            if i < len(dims):
                dims[i].dim_param = name


@contextlib.contextmanager
def _quiet():
    """The exporter and onnxslim warn about things that do not concern the user (torchvision ops not
    registered, deprecations inside torch); keep the progress output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxslim")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fmt_sizes(sizes: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())
