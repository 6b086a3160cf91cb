"""`osx bundle triton`: the repository's config.pbtxt files parse with Triton's own ModelConfig protobuf
(tritonclient) and match the bundle's component declarations; the Python-backend pipeline model runs
the NumPy scheduler loop with its component calls going through a stand-in of Triton's BLS API that
runs the repository's own model files on onnxruntime, and gives `Pipeline.generate`'s frames exactly."""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.cli import main

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient comes with the `test` extra")
from google.protobuf import json_format, text_format  # noqa: E402 (protobuf comes with tritonclient)

TYPES = {"float32": model_config_pb2.TYPE_FP32, "int64": model_config_pb2.TYPE_INT64}


def _config(path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _repository(bundle, out):
    main(["bundle", "triton", str(bundle), str(out)])
    return {p.parent.name: _config(p) for p in out.glob("*/config.pbtxt")}


def test_configs_parse_and_match_the_bundle(tiny_bundle, tmp_path):
    configs = _repository(tiny_bundle, tmp_path / "repo")
    assert sorted(configs) == ["osx_denoiser", "osx_pipeline", "osx_text_encoder", "osx_vae_decoder"]
    bundle = Bundle.open(tiny_bundle, verify=False)
    for component in ("text_encoder", "denoiser", "vae_decoder"):
        cfg, spec = configs[f"osx_{component}"], bundle.spec(component)
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        meta = bundle.components[component]  # the graph the osx runtime runs on onnxruntime: the fused one
        assert (tmp_path / "repo" / cfg.name / "1" / cfg.default_model_filename).read_bytes() == \
            (tiny_bundle / (meta.onnxruntime_file or meta.file)).read_bytes()
        for got, want in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
            assert [t.name for t in got] == [t.name for t in want]
            for g, w in zip(got, want):
                assert g.data_type == TYPES[spec.dtype_of(w)]
                assert list(g.dims) == [d if isinstance(d, int) else -1 for d in w.shape]
    pipe = configs["osx_pipeline"]
    assert pipe.backend == "python" and [t.name for t in pipe.input] == ["prompt", "options"] and pipe.input[1].optional
    assert pipe.output[0].data_type == model_config_pb2.TYPE_UINT8
    assert sorted(p.name for p in (tmp_path / "repo" / "osx_pipeline" / "1" / "bundle").iterdir()) == \
        ["manifest.json", "null_text.npy", "tokenizer.json"]


def test_engine_components_become_tensorrt_plans(fake_bundle, tmp_path):
    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    manifest["components"]["denoiser"]["backend"] = "tensorrt"
    (fake_bundle / "manifest.json").write_text(json.dumps(manifest))
    configs = _repository(fake_bundle, tmp_path / "repo")
    den = configs["osx_denoiser"]
    assert den.platform == "tensorrt_plan" and den.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert (tmp_path / "repo" / "osx_denoiser" / "1" / "model.plan").read_bytes() == b"\x07" * 3000
    assert configs["osx_text_encoder"].platform == "onnxruntime_onnx"
    assert not (tmp_path / "repo" / "osx_pipeline" / "1" / "bundle" / "engines").exists()


def test_existing_output_is_refused(tiny_bundle, tmp_path, capsys):
    (tmp_path / "repo").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["bundle", "triton", str(tiny_bundle), str(tmp_path / "repo")])
    assert exit_.value.code == 2 and "already exists" in capsys.readouterr().err
    assert list((tmp_path / "repo").iterdir()) == []


def _stand_in_pb_utils(repo):
    """What model.py uses of triton_python_backend_utils; BLS requests run the target model's file from
    the repository with onnxruntime, as Triton's onnxruntime backend would."""
    import onnxruntime as ort

    pb = types.ModuleType("triton_python_backend_utils")
    sessions = {}

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class TritonError:
        def __init__(self, message):
            self._message = message

        def message(self):
            return self._message

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error_ = output_tensors, error

        def has_error(self):
            return self.error_ is not None

        def error(self):
            return self.error_

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs

        def exec(self):
            if self.model_name not in sessions:
                cfg = _config(repo / self.model_name / "config.pbtxt")
                sessions[self.model_name] = ort.InferenceSession(str(repo / self.model_name / "1" / cfg.default_model_filename))
            out = sessions[self.model_name].run(self.outputs, {t.name(): t.as_numpy() for t in self.inputs})
            return InferenceResponse([Tensor(n, a) for n, a in zip(self.outputs, out)])

    pb.Tensor, pb.TritonError, pb.InferenceResponse, pb.InferenceRequest = Tensor, TritonError, InferenceResponse, InferenceRequest
    pb.get_input_tensor_by_name = lambda request, name: next((t for t in request if t.name() == name), None)
    pb.get_output_tensor_by_name = lambda response, name: next(t for t in response.output_tensors if t.name() == name)
    return pb


def test_pipeline_model_runs_the_scheduler_loop_over_bls(tiny_bundle, tmp_path, monkeypatch):
    from osx.runtime.pipeline import Pipeline

    repo = tmp_path / "repo"
    configs = _repository(tiny_bundle, repo)
    pb = _stand_in_pb_utils(repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("osx_triton_model", repo / "osx_pipeline" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(configs["osx_pipeline"], preserving_proto_field_name=True)),
                      "model_repository": str(repo / "osx_pipeline"), "model_version": "1"})
    text = lambda name, s: pb.Tensor(name, np.array([s.encode()], dtype=object))  # noqa: E731
    good = [text("prompt", "a red fox in the snow"), text("options", json.dumps({"seed": 5, "steps": 3}))]
    bad = [text("prompt", "x"), text("options", json.dumps({"num_frames": 5}))]
    ok, refused = model.execute([good, bad])
    want = Pipeline.load(tiny_bundle, verify=False).generate("a red fox in the snow", seed=5, steps=3)
    frames = pb.get_output_tensor_by_name(ok, "frames").as_numpy()
    assert not ok.has_error() and frames.dtype == np.uint8 and np.array_equal(frames, want)
    assert refused.has_error() and "5 frames: outside what this bundle supports" in refused.error().message()
