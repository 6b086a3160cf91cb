"""The reference dtype (SchedulerConfig.reference_dtype, declared by the family): bf16 reproduces Open-Sora's
default bf16 inference, fp32 an fp32 run. At each setting the NumPy scheduler equals the torch sampler, the
exported denoiser equals the torch one, and the runtime's loop equals the torch loop; and the two settings
differ, so the setting does something.

Tolerances: schedules are compared for equality (same float32 operations in the same order); the float64
formula bounds the fp32 shift ratio to 1e-6 relative; graph vs torch 1e-4 relative (onnxruntime's kernels);
NumPy loop vs torch loop 1e-5 relative per step (float32 summation order, as tests/test_runtime_pipeline.py).
"""

import dataclasses
import json
import math

import numpy as np
import pytest

from osx.families import family_of
from osx.models import SchedulerConfig, get_model_config
from osx.runtime import scheduler as rf

torch = pytest.importorskip("torch")
TINY = get_model_config("opensora-v1.2-tiny")
SIZES = [(480, 854, 102), (240, 426, 51), (720, 1280, 1), (64, 64, 34)]  # height, width, frames


def _sched(reference_dtype: str) -> SchedulerConfig:
    return dataclasses.replace(SchedulerConfig(), reference_dtype=reference_dtype)


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_the_configs_follow_their_family_declaration():
    family = family_of(TINY)
    assert family.reference_dtype == "bf16"
    for cfg in family.configs.values():
        assert cfg.scheduler.reference_dtype == family.reference_dtype, cfg.name


@pytest.mark.parametrize("reference_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("height, width, frames", SIZES)
def test_numpy_schedule_equals_the_torch_sampler(reference_dtype, height, width, frames):
    from osx.export.sampler import timesteps

    got = rf.timesteps(30, height, width, frames, reference_dtype=reference_dtype)
    np.testing.assert_array_equal(got, timesteps(_sched(reference_dtype), 30, height, width, frames).numpy())


def test_fp32_schedule_is_the_float_formula_and_differs_from_bf16():
    h, w, f = 480, 854, 102
    exact = math.sqrt(h * w / 512**2) * math.sqrt(f // 17 * 5)  # 6.8493...
    assert abs(np.asarray(rf.shift_ratio(h, w, f, reference_dtype="fp32")).item() / exact - 1) < 1e-6
    assert np.asarray(rf.shift_ratio(h, w, f)).item() == 6.84375  # bf16: Open-Sora's default inference
    bf16, fp32 = rf.timesteps(30, h, w, f), rf.timesteps(30, h, w, f, reference_dtype="fp32")
    assert bf16[0] == fp32[0] == 1000 and np.abs(bf16 - fp32).max() > 0.01


def _denoiser_inputs(batch=2):
    """Inputs where the rounding matters: t and sizes that bf16 cannot hold (854 -> 856, 999.3 -> 1000)."""
    spec = family_of(TINY).component_specs(TINY)["denoiser"]
    inputs = spec.sample_inputs({"batch": batch, "latent_frames": 2, "latent_height": 4, "latent_width": 6}, seed=3)
    inputs.update(timestep=np.array([999.3, 517.1][:batch], np.float32), fps=np.full(batch, 23.9, np.float32),
                  height=np.full(batch, 481.0, np.float32), width=np.full(batch, 854.0, np.float32))
    return spec, inputs


def _denoiser(reference_dtype):
    from osx.export.reference import build_reference

    cfg = dataclasses.replace(TINY, scheduler=_sched(reference_dtype))
    return build_reference(cfg).denoiser


@torch.no_grad()
def test_denoiser_rounds_its_conditioning_to_the_reference_dtype():
    """bf16 = the fp32 model fed the inputs torch casts to bfloat16 (an independent rounding); fp32 rounds nothing."""
    spec, inputs = _denoiser_inputs()
    bf16, fp32 = _denoiser("bf16"), _denoiser("fp32")
    args = [torch.from_numpy(inputs[t.name]) for t in spec.inputs]
    cast = [a.to(torch.bfloat16).float() if t.name in ("timestep", "fps", "height", "width") else a
            for t, a in zip(spec.inputs, args)]
    assert torch.equal(bf16(*args), fp32(*cast))
    assert _relative(fp32(*args), bf16(*args)) > 1e-3  # the setting changes the output


@pytest.mark.slow
def test_exported_denoiser_follows_the_reference_dtype(tiny_bundle, tmp_path):
    """`osx export --reference-dtype`: recorded in the manifest, and the graph equals the torch denoiser of
    its own setting and not the other's. bf16 is the family's default: the session bundle's denoiser."""
    import onnxruntime as ort

    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    spec, inputs = _denoiser_inputs()
    with torch.no_grad():
        want = {d: _denoiser(d)(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))[:, :4].numpy()
                for d in ("bf16", "fp32")}
    export_bundle(ExportRequest(TINY.name, tmp_path / "fp32", RANDOM_WEIGHTS, dtype="fp32", only=("denoiser",),
                                reference_dtype="fp32", progress=lambda m: None))
    for d, other, out in (("bf16", "fp32", tiny_bundle), ("fp32", "bf16", tmp_path / "fp32")):
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["scheduler"]["reference_dtype"] == manifest["model"]["config"]["scheduler"]["reference_dtype"] == d
        session = ort.InferenceSession(str(out / "denoiser.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(["v"], {k: v for k, v in inputs.items() if k in {i.name for i in session.get_inputs()}})[0]
        assert _relative(got, want[d]) < 1e-4, d
        assert _relative(got, want[other]) > 1e-3, d


def test_runtime_loop_equals_the_torch_sampler_at_fp32(tiny_bundle):
    """The runtime's NumPy loop with reference dtype fp32 (the torch STDiT3 as its denoiser backend) equals
    the torch sampler at fp32 step by step; and its final latent differs from the bf16 loop's."""
    from test_runtime_pipeline import TorchDenoiser

    from osx.export.sampler import sample
    from osx.runtime.pipeline import Pipeline

    pipe = Pipeline.load(tiny_bundle)
    request = pipe.prepare_request("a red fox in the snow", seed=5, steps=4)
    y, mask = pipe.encode_text(request)
    noise = pipe.initial_noise(request)
    finals = {}
    for d in ("fp32", "bf16"):
        model = _denoiser(d)
        backend = TorchDenoiser(model)  # records every input latent
        loop = Pipeline(pipe.bundle, {**pipe.backends, "denoiser": backend})
        loop.scheduler = dataclasses.replace(loop.scheduler, reference_dtype=d)
        finals[d] = loop.denoise(request, y, mask, noise)
        _, want = sample(model, torch.from_numpy(noise), torch.from_numpy(y[:1]), torch.from_numpy(mask[:1]),
                         torch.from_numpy(y[1:]), height=request.height, width=request.width, num_frames=request.num_frames,
                         fps=request.fps, steps=request.steps, guidance_scale=request.guidance_scale, sched=loop.scheduler,
                         return_intermediates=True)
        got = [x[:1] for x in backend.inputs[1:]] + [finals[d]]
        for i, (a, b) in enumerate(zip(got, want)):
            assert _relative(a, b.numpy()) < 1e-5, (d, i)
    assert _relative(finals["fp32"], finals["bf16"]) > 1e-4
