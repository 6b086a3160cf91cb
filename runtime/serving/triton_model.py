"""Triton Python-backend model `osx_pipeline` (written by `osx bundle triton` as 1/model.py).

Input "prompt" (one string) and optional "options" (one JSON string: negative_prompt, num_frames,
height, width, fps, steps, guidance_scale, seed; unset ones take the bundle's defaults). Output
"frames": uint8 [frames, height, width, 3]. The scheduler loop is osx's own NumPy one
(osx.runtime.Pipeline); each component call is a BLS request to the component's model in the same
Triton server. Needs osx's base install in Triton's Python (`pip install .` from the osx clone; no torch).
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from osx.bundle import Bundle
from osx.errors import OsxError
from osx.runtime.pipeline import Pipeline


class BlsBackend:
    """A Pipeline backend whose `run` is an inference request to another model of this server. Its shapes
    are those of what the model serves: the component's first engine (the one `osx bundle triton` puts in
    the repository) or the ONNX ranges."""

    loaded = True
    load_one_at_a_time = False  # Triton keeps every model loaded

    def __init__(self, name: str, model: str, outputs: list[str], entry):
        self.name, self.model, self.outputs = name, model, outputs
        self.engine = entry.engines[0] if entry.backend == "tensorrt" and entry.engines else None
        self.spec = entry.io

    def limits(self) -> list[dict]:
        return self.engine.profiles() if self.engine else [self.spec.dims]

    def buckets(self) -> list[tuple[int, int, int]]:
        return self.engine.buckets() if self.engine else []

    def load(self) -> None:
        pass

    def release(self) -> None:
        pass

    def run(self, inputs: dict) -> dict:
        request = pb_utils.InferenceRequest(model_name=self.model, requested_output_names=self.outputs,
                                            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise OsxError(f"{self.model}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.outputs}


def _text(request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args):
        from osx.runtime.serving.triton import read_components
        from osx.runtime.shim import _GENERATE_OPTIONS, _parse_options

        self.parse = lambda text: _parse_options(text or "{}", _GENERATE_OPTIONS)
        config = json.loads(args["model_config"])
        bundle = Bundle.open(Path(args["model_repository"]) / args["model_version"] / "bundle", verify=False)
        models = read_components(config["parameters"])
        backends = {c: BlsBackend(c, m, [t.name for t in bundle.spec(c).outputs], bundle.components[c]) for c, m in models.items()}
        self.pipeline = Pipeline(bundle, backends)  # a TensorRT bundle's static shape buckets hold here too

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                options = self.parse(_text(request, "options"))
                frames = self.pipeline.generate(_text(request, "prompt") or "", **options)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("frames", frames)]))
            except Exception as e:  # noqa: BLE001 - the client gets the reason, the server goes on
                message = f"{e.message} ({e.hint})" if isinstance(e, OsxError) and e.hint else str(e)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)))
        return responses
