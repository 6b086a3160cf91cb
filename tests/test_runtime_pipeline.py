"""The torch-free pipeline on the tiny bundle vs the torch reference (osx.export), plus its checks.

Tolerances: the NumPy scheduler driven by the torch denoiser matches the torch sampler to 1e-5 relative
per step (float32; only summation order differs); the whole ONNX pipeline matches reference_generate
to 1e-3 relative on the final latent and 2 uint8 levels on the frames (onnxruntime's fused kernels).
"""

import json
import shutil

import numpy as np
import pytest

from osx.errors import BundleError, InputError
from osx.runtime import scheduler as rf
from osx.runtime.pipeline import GenerationCancelled, Pipeline
from osx.runtime.prompt import EmptyPromptWarning
from osx.runtime.tokenizer import PromptTruncatedWarning

torch = pytest.importorskip("torch")
PROMPT = "A red fox runs through fresh snow at sunrise."


@pytest.fixture(scope="module")
def reference(tiny_bundle):
    """The torch model the tiny bundle was exported from (same config, same seeded weights)."""
    from osx.export.reference import build_reference

    return build_reference(Pipeline.load(tiny_bundle, verify=False).model)


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.load(tiny_bundle)


def relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


class TorchDenoiser:
    """A Backend running the torch reference STDiT3 (with x_mask when given), recording every input latent."""

    name, loaded = "denoiser", True

    def __init__(self, model):
        self.model, self.inputs = model, []

    def load(self):
        pass

    def release(self):
        pass

    @torch.no_grad()
    def run(self, inputs):
        self.inputs.append(inputs["x"].copy())
        names = ("x", "timestep", "y", "mask", "fps", "height", "width", "x_mask")
        args = [torch.from_numpy(np.asarray(inputs[k])) for k in names if k in inputs]
        return {"v": self.model(*args)[:, :4].numpy()}


def test_scheduler_matches_torch_reference_sampler(pipe, reference):
    from osx.export.sampler import sample, timesteps

    request = pipe.prepare_request(PROMPT, seed=5)
    sched = pipe.scheduler
    np.testing.assert_array_equal(  # timesteps equal
        rf.timesteps(request.steps, request.height, request.width, request.num_frames),
        timesteps(sched, request.steps, request.height, request.width, request.num_frames).numpy())

    y, mask = pipe.encode_text(request)
    noise = pipe.initial_noise(request)
    torch_denoiser = TorchDenoiser(reference.denoiser)
    numpy_loop = Pipeline(pipe.bundle, {**pipe.backends, "denoiser": torch_denoiser})
    final = numpy_loop.denoise(request, y, mask, noise)
    _, want = sample(reference.denoiser, torch.from_numpy(noise), torch.from_numpy(y[:1]), torch.from_numpy(mask[:1]),
                     torch.from_numpy(y[1:]), height=request.height, width=request.width, num_frames=request.num_frames,
                     fps=request.fps, steps=request.steps, guidance_scale=request.guidance_scale, sched=sched,
                     return_intermediates=True)
    got = [x[:1] for x in torch_denoiser.inputs[1:]] + [final]  # the latent after step i is the input of step i + 1
    assert len(got) == len(want) == request.steps
    for i, (a, b) in enumerate(zip(got, want)):
        assert relative(a, b.numpy()) < 1e-5, f"step {i}"


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_pipeline_matches_reference_generate(pipe, reference, negative_prompt):
    from osx.export.pipeline import reference_generate

    noise = rf.initial_noise(123, (1, 4, 10, 8, 8))
    want = reference_generate(reference, PROMPT, negative_prompt=negative_prompt, noise=noise, steps=4)
    request = pipe.prepare_request(PROMPT, negative_prompt, steps=4)
    y, mask = pipe.encode_text(request)
    latent = pipe.denoise(request, y, mask, noise)
    assert relative(latent, want.latent) < 1e-3
    frames = pipe.generate(PROMPT, negative_prompt, steps=4, noise=noise)
    assert frames.dtype == np.uint8 and frames.shape == want.frames.shape == (34, 64, 64, 3)
    assert np.abs(frames.astype(int) - want.frames).max() <= 2


def test_same_seed_same_frames_other_seed_differs(pipe):
    a = pipe.generate(PROMPT, seed=1, steps=3, num_frames=17)
    np.testing.assert_array_equal(a, pipe.generate(PROMPT, seed=1, steps=3, num_frames=17))
    assert np.abs(a.astype(int) - pipe.generate(PROMPT, seed=2, steps=3, num_frames=17)).mean() > 1


def test_two_calls_when_the_bundle_has_no_batch_2(tiny_bundle, pipe):
    two = Pipeline.load(tiny_bundle, verify=False)
    two.cfg_batching = False
    request = pipe.prepare_request(PROMPT, steps=3, num_frames=17)
    y, mask = pipe.encode_text(request)
    assert relative(two.denoise(request, y, mask), pipe.denoise(request, y, mask)) < 1e-5


def test_one_component_at_a_time_and_progress_events(tiny_bundle):
    p = Pipeline.load(tiny_bundle, verify=False)
    p.load_one_at_a_time = True
    events, loaded = [], []

    def progress(event):
        events.append(event)
        loaded.append({n: b.loaded for n, b in p.backends.items()})

    p.generate(PROMPT, steps=4, progress=progress)
    assert [e["phase"] for e in events] == ["text_encoder"] + ["denoise"] * 4 + ["vae_decode"] * 2
    announced = p.progress_phases(p.prepare_request(PROMPT, steps=4))  # what osx serve weighs its fraction by
    assert [(p_, n) for p_, n in announced for _ in range(n)] == [(e["phase"], e["total"]) for e in events]
    assert [e["step"] for e in events[1:5]] == [1, 2, 3, 4] and all(e["total"] == 4 for e in events[1:5])
    assert all(e["eta"] >= 0 for e in events) and events[-1]["eta"] == 0
    assert [e["elapsed"] for e in events] == sorted(e["elapsed"] for e in events)
    assert {"text_encoder", "denoiser", "vae_decoder"} <= set(loaded[0])  # (and the VAE encoder, never used here)
    assert loaded[0] == dict.fromkeys(p.backends, False)  # T5 released first
    assert loaded[1] == {**dict.fromkeys(p.backends, False), "denoiser": True}
    assert not any(b.loaded for b in p.backends.values())
    steps = p.timings["steps"]
    assert len(steps) == 4 and all(0 < s["denoiser_s"] <= s["total_s"] for s in steps)


def test_cancel_between_steps(pipe):
    seen = []
    with pytest.raises(GenerationCancelled, match="after step 2 of 5"):
        pipe.generate(PROMPT, steps=5, progress=lambda e: seen.append(e["step"]) or e["step"] < 2 or e["phase"] != "denoise")

    def cancel_from_callback(event):  # e.g. a GUI's cancel button on another thread
        if event["phase"] == "denoise":
            pipe.cancel()

    with pytest.raises(GenerationCancelled, match="after step 1"):
        pipe.generate(PROMPT, steps=5, progress=cancel_from_callback)
    assert pipe.generate(PROMPT, steps=1, num_frames=17).shape[0] == 17  # a new run is not cancelled


def test_prompt_warnings(pipe):
    with pytest.warns(EmptyPromptWarning):
        assert pipe.generate("", steps=1, num_frames=17).shape == (17, 64, 64, 3)
    with pytest.warns(PromptTruncatedWarning, match="tokens; the text encoder takes 32"):
        pipe.generate(" ".join(["snowy forest"] * 30), steps=1, num_frames=17)


@pytest.mark.parametrize("kwargs,message", [
    ({"height": 480, "width": 854}, "854x480 \\(WxH\\): outside"),
    ({"height": 8, "width": 64}, "64x8 \\(WxH\\)"),
    ({"num_frames": 60}, "60 frames: outside"),
    ({"num_frames": 5}, "5 frames: outside"),  # Open-Sora's transform needs 1 or >= 17 frames
    ({"steps": 0}, "steps=0"),
    ({"fps": 0}, "fps=0"),
    ({"guidance_scale": float("nan")}, "guidance scale=nan"),
])
def test_bad_requests_fail_before_any_work(tiny_bundle, kwargs, message):
    p = Pipeline.load(tiny_bundle, verify=False)
    with pytest.raises(InputError, match=message) as e:
        p.generate(PROMPT, **kwargs)
    if "outside" in message:
        assert "width 16..128 px, height 16..128 px" in e.value.hint and "frames 1, 17..51" in e.value.hint
    assert not any(b.loaded for b in p.backends.values())


def test_wrong_noise_shape(pipe):
    with pytest.raises(InputError, match="noise has shape"):
        pipe.generate(PROMPT, noise=np.zeros((1, 4, 3, 8, 8), np.float32))


def test_missing_and_corrupt_bundles(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Pipeline.load(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    data = bytearray((broken / "denoiser.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "denoiser.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for denoiser.onnx"):
        Pipeline.load(broken)
    (broken / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Pipeline.load(broken)


def test_bundle_missing_a_component(tiny_bundle, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_bundle, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    del manifest["components"]["vae_decoder"]
    (partial / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="lacks vae_decoder"):
        Pipeline.load(partial, verify=False)


def test_onnxruntime_backend_graph_and_session(tiny_bundle):
    """The CPU backend runs the graph fused for onnxruntime; TensorRT's provider the portable one (it cannot
    parse com.microsoft operators). Sessions: arena on, no spinning, one thread per physical core."""
    import os

    from osx.bundle import Bundle
    from osx.runtime.backends import OrtBackend, physical_cores, session_options

    b = Bundle.open(tiny_bundle, verify=False)
    assert OrtBackend(b, "denoiser").path.name == "denoiser.ort.onnx"
    assert OrtBackend(b, "denoiser", providers=("tensorrt", "cuda", "cpu")).path.name == "denoiser.onnx"
    assert OrtBackend(b, "vae_decoder").path.name == "vae_decoder.onnx"
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))
    options = session_options()
    assert options.enable_cpu_mem_arena and options.intra_op_num_threads == physical_cores()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(3).intra_op_num_threads == 3
