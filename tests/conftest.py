"""Shared test setup. Every test runs on tiny configs with seeded random weights built here."""

import importlib.util
import shutil

import pytest


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install -e '.[tensorrt]' from the osx clone, on a machine with an NVIDIA GPU)"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU / driver found (nvidia-smi missing)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _io_only_graph(spec) -> bytes:
    """An ONNX model declaring `spec`'s inputs and outputs and nothing else: what `bundle verify` reads."""
    from onnx import TensorProto, helper

    types = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}
    values = [[helper.make_tensor_value_info(t.name, types[spec.dtype_of(t)], None) for t in ts]
              for ts in (spec.inputs, spec.outputs)]
    return helper.make_model(helper.make_graph([], spec.name, *values)).SerializeToString()


@pytest.fixture
def fake_bundle(tmp_path):
    """A small hand-made bundle (graphs that declare their I/O only, real manifest schema, one TensorRT engine entry)
    for tests of the bundle container itself: archives, verify, info. Not runnable."""
    from osx.bundle import BundleWriter
    from osx.families import component_specs, get_family
    from osx.models import get_model_config
    from osx.engine_key import engine_key
    from osx.manifest import ComponentEntry, EngineEntry, Manifest

    cfg = get_model_config("opensora-v1.2-tiny")
    specs = component_specs(cfg)
    out = tmp_path / "fake_bundle"
    with BundleWriter(out) as w:
        comps = {}
        for name in get_family("opensora-v1.2").names(pipeline_only=True):
            (w.dir / f"{name}.onnx").write_bytes(_io_only_graph(specs[name]))
            comps[name] = ComponentEntry(file=f"{name}.onnx", precision="fp32", io=specs[name])
        (w.dir / "engines").mkdir()
        (w.dir / "engines" / "denoiser.plan").write_bytes(b"\x07" * 3000)
        key = engine_key(onnx_sha256="0" * 64, tensorrt_version="10.3.0", gpu_name="NVIDIA GeForce RTX 4090",
                         compute_capability="8.9", hardware_compatibility="none", version_compatible=False,
                         precision="fp16", calibration_hash=None, build_flags={}, profiles=[], buckets={})
        comps["denoiser"] = comps["denoiser"].with_engine(EngineEntry(file="engines/denoiser.plan", key=key))
        (w.dir / "tokenizer.json").write_text('{"model": "fake"}')
        w.commit(Manifest(model={"name": cfg.name, "family": cfg.family, "config": cfg.to_dict()}, components=comps,
                          tokenizer={"file": "tokenizer.json", "max_length": cfg.text_encoder.max_length},
                          scheduler={"num_sampling_steps": 4}, plan={"name": "rtx4090"}, build={"osx": "test"}))
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny default exported once per session exactly as the README demo does it (`osx export
    --model opensora-v1.2-tiny --random-weights --gpu cpu`): a real, runnable bundle. Read-only: tests
    that damage a bundle copy it first. Its weights are `build_reference(tiny config)`'s."""
    pytest.importorskip("torch", reason="exporting needs the `export` extra")
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(ExportRequest("opensora-v1.2-tiny", out, RANDOM_WEIGHTS, gpu="cpu", progress=lambda msg: None))
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny torch models run 10-50x faster on one thread than with torch's busy-waiting thread pool on
    shared cores. Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _osx_export(out, *args):
    """`osx export --model opensora-v2.0-tiny --random-weights --gpu cpu --reference-dtype fp32 ARGS --out OUT` (the CLI,
    in this process)."""
    from osx.cli import main

    try:
        main(["export", "--model", "opensora-v2.0-tiny", "--random-weights", "--gpu", "cpu", "--reference-dtype", "fp32",
              *args, "--out", str(out)])
    except SystemExit as e:
        assert not e.code, f"osx export exited with {e.code}"
    return out


@pytest.fixture(scope="session")
def tiny_v2_bundle(tmp_path_factory):
    """`osx export --model opensora-v2.0-tiny --random-weights --gpu cpu --with-vae-encoder --reference-dtype fp32`,
    once per session (the CLI, in this process): T5, CLIP, MMDiT, VAE decoder and encoder. Read-only, like
    `tiny_bundle`. Reference dtype fp32 (no bf16 rounding in the loop), so that runtime-vs-torch tests can hold
    1e-4 over whole runs; Open-Sora's bf16 loop is tested over its own denoiser export (test_runtime_v2_bundle)."""
    pytest.importorskip("torch", reason="exporting needs the `export` extra")
    return _osx_export(tmp_path_factory.mktemp("bundles") / "tiny-v2", "--with-vae-encoder")


@pytest.fixture(scope="session")
def tiny_t2i_bundle(tiny_v2_bundle, tmp_path_factory):
    """What `osx export --model opensora-v2.0-tiny --random-weights --gpu cpu --with-t2i --reference-dtype fp32` writes,
    once per session: the v2.0 components and t2i2v's Flux.1-dev and its AE decoder (seeded like the rest). Read-only.
    Reference dtype fp32, as `tiny_v2_bundle`: the whole text -> image -> video flow can then hold 1e-4 against torch.

    The v2.0 components are not exported a second time: the same command with `--component t2i_denoiser --component
    t2i_decoder` writes the whole export's plan and those two graphs, and `tiny_v2_bundle` (the same weights, dtypes and
    planned shapes, checked here) gives the rest, file for file. A whole `--with-t2i` export's graphs are byte-identical
    to these and its manifest differs only in seconds (compared once by hand)."""
    pytest.importorskip("torch", reason="exporting needs the `export` extra")
    from osx.bundle import Bundle, BundleWriter

    root = tmp_path_factory.mktemp("bundles")
    part = _osx_export(root / "t2i-part", "--with-t2i", "--component", "t2i_denoiser", "--component", "t2i_decoder")
    base, t2i = Bundle.open(tiny_v2_bundle).manifest, Bundle.open(part).manifest
    assert base.model == t2i.model and base.scheduler == t2i.scheduler and base.tokenizer == t2i.tokenizer
    assert all(base.plan["components"][n] == t2i.plan["components"][n] for n in base.components), "not the same plan"
    assert not set(base.components) & set(t2i.components)
    out = root / "tiny-t2i"
    with BundleWriter(out) as w:
        for folder, files in ((tiny_v2_bundle, base.files), (part, t2i.files)):
            for name, entry in files.items():
                assert base.files.get(name, entry) == entry, name  # the tokenizers: written alike by both
                (w.dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, w.dir / name)
        w.commit(t2i.replace(components={**base.components, **t2i.components}))
    shutil.rmtree(part)
    return out


@pytest.fixture(scope="session")
def tiny_fp16_graphs(tmp_path_factory):
    """The tiny v1.2 reference's denoiser and VAE decoder (`build_reference`: `tiny_bundle`'s weights) exported in memory
    at fp16 (`export_component`), once per session: {component: graph path}. test_stream compares the streamed fp16
    denoiser with this one; test_lint lints both."""
    pytest.importorskip("torch", reason="exporting needs the `export` extra")
    from osx.export.onnx_export import export_component
    from osx.export.reference import build_reference
    from osx.families import component_specs
    from osx.models import OPENSORA_V1_2_TINY as TINY

    ref, specs, out = build_reference(TINY), component_specs(TINY), tmp_path_factory.mktemp("tiny_fp16")
    for name, module in (("denoiser", ref.denoiser), ("vae_decoder", ref.vae)):
        export_component(module, specs[name], out / f"{name}.fp16.onnx", dtype="fp16")
    return {name: out / f"{name}.fp16.onnx" for name in ("denoiser", "vae_decoder")}
