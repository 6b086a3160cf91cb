"""`osx bundle triton BUNDLE OUT`: a model repository for NVIDIA Triton Inference Server.

    OUT/osx_text_encoder/config.pbtxt + 1/<file>   one model per component: `tensorrt_plan` where the
    OUT/osx_denoiser/...                           bundle runs it on TensorRT (its engine as model.plan),
    OUT/osx_vae_decoder/...                        else `onnxruntime_onnx` (the ONNX file + external data)
    OUT/osx_pipeline/config.pbtxt + 1/model.py     Python backend: text in, uint8 frames out; runs
                     1/bundle/ (manifest, tokenizer, the NumPy scheduler loop (osx.runtime.Pipeline) and
                     null caption)                  calls the three models above through BLS

Files are hard-linked from the bundle where the file system allows (bundles are large and read-only),
else copied; the repository is built under a temporary name beside OUT and renamed into place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from osx.bundle import Bundle
from osx.errors import OsxError
from osx.runtime.pipeline import Pipeline

PREFIX = "osx_"
COMPONENTS = ("text_encoder", "denoiser", "vae_decoder")  # the order the pipeline runs them in
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
MODEL_PY = Path(__file__).with_name("triton_model.py")


def _tensors(kind: str, spec, tensors) -> str:
    rows = []
    for t in tensors:
        dtype = spec.dtype_of(t)
        if dtype not in TRITON_TYPES:
            raise OsxError(f"{spec.name}.{t.name}: dtype {dtype} has no Triton type", hint=f"known: {', '.join(TRITON_TYPES)}")
        dims = ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.shape)
        rows.append(f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_TYPES[dtype]}\n    dims: [ {dims} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def component_config(bundle: Bundle, component: str) -> tuple[str, dict[str, str]]:
    """(config.pbtxt text, {file in the version folder: file in the bundle}) for one component.
    max_batch_size 0: osx's batch is a dimension of each tensor (cond + uncond in one call)."""
    meta, spec = bundle.components[component], bundle.spec(component)
    if meta.backend == "tensorrt" and meta.engines:
        platform, files, kind = "tensorrt_plan", {"model.plan": meta.engines[0].file}, "KIND_GPU"
    else:
        # the graph osx's own onnxruntime backend runs: the fused one on the CPU (its contrib ops are
        # onnxruntime's, which Triton's onnxruntime backend has), so Triton's frames equal Pipeline's
        model = meta.onnxruntime_file if meta.backend == "onnxruntime" and meta.onnxruntime_file else meta.file
        files = {Path(f).name: f for f in (model, meta.file_of("data_file")) if f}
        platform, kind = "onnxruntime_onnx", "KIND_GPU" if meta.backend != "onnxruntime" else "KIND_CPU"
    text = f'name: "{PREFIX}{component}"\nplatform: "{platform}"\nmax_batch_size: 0\n'
    if platform == "onnxruntime_onnx":
        text += f'default_model_filename: "{Path(model).name}"\n'
    text += _tensors("input", spec, spec.inputs) + _tensors("output", spec, spec.outputs)
    text += f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]\n"
    return text, files


def pipeline_config(bundle: Bundle) -> str:
    names = ", ".join(f"{c}={PREFIX}{c}" for c in COMPONENTS)
    return (f'name: "{PREFIX}pipeline"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [\n  {\n    name: "prompt"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n  },\n'
            '  {\n    name: "options"\n    data_type: TYPE_STRING\n    dims: [ 1 ]\n    optional: true\n  }\n]\n'
            'output [\n  {\n    name: "frames"\n    data_type: TYPE_UINT8\n    dims: [ -1, -1, -1, 3 ]\n  }\n]\n'
            'instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n'
            f'parameters [\n  {{\n    key: "components"\n    value: {{ string_value: "{names}" }}\n  }}\n]\n')


def write_repository(bundle_path: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Write the repository to `out` (which must not exist yet); returns its model names."""
    bundle = Bundle.open(bundle_path, verify=False)
    bundle.verify(checksums=False)
    Pipeline.required_components(bundle)  # the pipeline model runs v1.2's loop: other families are refused, saying why
    out = Path(out)
    if out.exists():
        raise OsxError(f"{out} already exists", hint="give a new folder (nothing is overwritten)")
    if not out.parent.is_dir():
        raise OsxError(f"cannot write {out}: folder {out.parent} does not exist", hint=f"create it first (mkdir -p {out.parent})")
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        placed = set()
        for component in COMPONENTS:
            text, files = component_config(bundle, component)
            _write(tmp / f"{PREFIX}{component}" / "config.pbtxt", text)
            for name, rel in files.items():
                _place(bundle.path(rel), tmp / f"{PREFIX}{component}" / "1" / name)
                placed.add(rel)
        pipeline = tmp / f"{PREFIX}pipeline"
        _write(pipeline / "config.pbtxt", pipeline_config(bundle))
        shutil.copyfile(MODEL_PY, pipeline / "1" / "model.py")
        graphs = {f for m in bundle.components.values() for f in _graph_files(m)}
        for rel in ["manifest.json", *bundle.manifest.files]:
            if rel not in placed and rel not in graphs:  # the pipeline model calls the components; it needs no graph
                _place(bundle.path(rel), pipeline / "1" / "bundle" / rel)
        os.replace(tmp, out)
    except OSError as e:
        raise OsxError(f"cannot write the Triton repository {out}: {e.strerror or e}", hint="check the folder and free space") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [f"{PREFIX}{c}" for c in COMPONENTS] + [f"{PREFIX}pipeline"]


def _graph_files(meta) -> set[str]:
    """Every graph or engine file of a component entry (not its other files, such as null_text.npy)."""
    return {f for f in (meta.file, meta.file_of("data_file"), meta.onnxruntime_file, *meta.onnx_files.values(),
                        *(e.file for e in meta.engines)) if f}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / "1").mkdir(exist_ok=True)
    path.write_text(text)


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_components(parameters: dict) -> dict[str, str]:
    """The pipeline model's `components` parameter -> {component: Triton model name}."""
    value = parameters["components"]["string_value"]
    return dict(pair.split("=", 1) for pair in value.split(", "))

