"""Image-to-video on v1.2 bundles: reference preprocessing, the mask strategy, runtime vs torch reference.

Tolerances: NumPy preprocessing vs PIL + torch within 1 uint8 level (PIL resamples in fixed point, the
NumPy path in float64); the NumPy mask loop driven by the torch STDiT3 matches the torch sampler's mask
strategy to 1e-4 relative per step (float32, summation order only); the all-ONNX pipeline matches
reference_generate to 1e-3 relative on the latent (as text-to-video), and the conditioned first frame
to 1 uint8 level (the held latent frame decodes alone: the temporal VAE is causal).
"""

import numpy as np
import pytest

from osx.errors import BundleError, InputError
from osx.runtime import scheduler as rf
from osx.runtime.conditioning import Condition, MaskSchedule, load_image, preprocess
from osx.runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")
from test_runtime_pipeline import TorchDenoiser  # noqa: E402  (passes x_mask on to the torch STDiT3)
PROMPT = "A lighthouse on a cliff, waves below."


def relative(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def image(h, w, seed=0):  # smooth content plus a little noise, like a photo
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 5 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("src,dst", [((37, 53), (64, 80)), ((300, 200), (64, 96)), ((64, 64), (64, 64)), ((90, 160), (48, 48))])
def test_preprocess_matches_pil_and_torch(src, dst):
    from osx.export.pipeline import reference_preprocess

    img = image(*src)
    got = preprocess(img, *dst)
    want = reference_preprocess(img, *dst).numpy()[:, None]
    assert got.shape == want.shape == (3, 1, *dst) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 2 / 255 + 1e-6  # one uint8 level in [-1, 1]
    assert got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("where,frames", [("head", [0]), ("tail", [4]), ("loop", [0, 4])])
def test_condition_places_the_reference(where, frames):
    ref = np.random.default_rng(0).standard_normal((1, 4, 1, 3, 3)).astype(np.float32)
    c = Condition.image(ref, 5, where)
    assert [f for f in range(5) if c.mask[f] == 0] == frames and (c.mask[[f for f in range(5) if f not in frames]] == 1).all()
    z = MaskSchedule(c, seed=0, has_x_mask=True).start(np.zeros((1, 4, 5, 3, 3), np.float32))
    for f in range(5):
        np.testing.assert_array_equal(z[:, :, f], ref[:, :, 0] if f in frames else 0)


def test_mask_schedule_generating_rule_and_reset():
    """Edit ratio 0.5 at frame 0: held clean (x_mask 0, reset after the step) while t > 500, then noised to
    level t once and generated from there on; the other frames always generate."""
    c = Condition(np.ones((1, 1, 3, 1, 1), np.float32), np.array([0.5, 1, 1], np.float32))
    m = MaskSchedule(c, seed=3, has_x_mask=True)
    z = m.start(np.zeros((1, 1, 3, 1, 1), np.float32))
    z, x_mask = m.before_step(z, 800.0, 1000)
    np.testing.assert_array_equal(x_mask, [[0, 1, 1]])
    np.testing.assert_array_equal(m.after_step(z + 5), [[[[[1]], [[5]], [[5]]]]])  # frame 0 reset to x0
    z, x_mask = m.before_step(np.ones((1, 1, 3, 1, 1), np.float32), 400.0, 1000)
    np.testing.assert_array_equal(x_mask, [[1, 1, 1]])
    eps = np.random.default_rng([3, 1]).standard_normal((1, 1, 3, 1, 1), dtype=np.float32)
    np.testing.assert_allclose(z[0, 0, 0], 0.6 * 1 + 0.4 * eps[0, 0, 0], rtol=1e-6)  # fresh noise at level t
    np.testing.assert_array_equal(z[0, 0, 1:], 1)  # already generating: untouched
    assert m.after_step(z + 2)[0, 0, 0] == z[0, 0, 0] + 2


@pytest.fixture(scope="module")
def i2v_bundle(tmp_path_factory):
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    out = tmp_path_factory.mktemp("bundles") / "tiny-i2v"
    export_bundle(ExportRequest("opensora-v1.2-tiny", out, RANDOM_WEIGHTS, gpu="cpu", with_components=("vae_encoder",),
                                progress=lambda msg: None))
    return out


@pytest.fixture(scope="module")
def pipe(i2v_bundle):
    return Pipeline.load(i2v_bundle)


@pytest.fixture(scope="module")
def reference(pipe):
    from osx.export.reference import build_reference

    return build_reference(pipe.model)


def test_numpy_mask_loop_matches_torch_sampler(pipe, reference):
    from osx.export.sampler import sample

    request = pipe.prepare_request(PROMPT, steps=5, seed=2)
    lh, lw = pipe.latent_shape(request)[3:]
    cond = pipe.condition_on(image(8 * lh, 8 * lw), "head", request)
    y, mask = pipe.encode_text(request)
    noise = pipe.initial_noise(request)
    den = TorchDenoiser(reference.denoiser)
    final = Pipeline(pipe.bundle, {**pipe.backends, "denoiser": den}).denoise(request, y, mask, noise, condition=cond)
    _, want = sample(reference.denoiser, torch.from_numpy(noise), torch.from_numpy(y[:1]), torch.from_numpy(mask[:1]),
                     torch.from_numpy(y[1:]), height=request.height, width=request.width, num_frames=request.num_frames,
                     fps=request.fps, steps=request.steps, guidance_scale=request.guidance_scale, sched=pipe.scheduler,
                     return_intermediates=True, cond_latent=torch.from_numpy(cond.latent), cond_mask=torch.from_numpy(cond.mask[None]))
    got = [x[:1] for x in den.inputs[1:]] + [final]
    for i, (a, b) in enumerate(zip(got, want)):
        assert relative(a, b.numpy()) < 1e-4, f"step {i}"
    np.testing.assert_array_equal(final[:, :, 0], cond.latent[:, :, 0])  # the conditioned frame is held exactly


def test_image_to_video_head_matches_reference(pipe, reference):
    from osx.export.pipeline import reference_generate

    request = pipe.prepare_request(PROMPT, steps=4)
    shape = pipe.latent_shape(request)
    img = image(8 * shape[3], 8 * shape[4], seed=4)  # the target size: both paths see the same pixels
    noise = rf.initial_noise(9, shape)
    want = reference_generate(reference, PROMPT, noise=noise, steps=4, image=img, condition="head")
    frames = pipe.generate(PROMPT, steps=4, noise=noise, image=img, condition="head")
    text_only = pipe.generate(PROMPT, steps=4, noise=noise)
    assert frames.shape == want.frames.shape
    assert np.abs(frames[0].astype(int) - want.frames[0]).max() <= 1  # the conditioned frame
    assert np.abs(frames.astype(int) - want.frames).max() <= 2
    assert np.abs(frames[0].astype(int) - text_only[0]).mean() > 5  # the image did change the video
    # the held latent frame decodes to the reference image (up to the VAE's own reconstruction)
    latent = pipe.denoise(request, *pipe.encode_text(request), noise, condition=pipe.condition_on(img, "head", request))
    assert relative(latent, want.latent) < 1e-3


def test_image_file_and_bad_references(pipe, tmp_path):
    import cv2

    request = pipe.prepare_request(PROMPT, steps=1)
    png = tmp_path / "ref.png"
    cv2.imwrite(str(png), image(40, 30)[:, :, ::-1])
    np.testing.assert_array_equal(load_image(png), image(40, 30))
    assert pipe.condition_on(png, "tail", request).mask[-1] == 0
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "empty.png").write_bytes(b"")
    for bad, message in [(tmp_path / "broken.png", "not a readable image"), (tmp_path / "empty.png", "not a readable image"),
                         (tmp_path / "missing.png", "does not exist"), (tmp_path, "does not exist"),
                         (np.zeros((4, 4), np.uint8), "expected uint8 \\[H, W, 3\\]")]:
        with pytest.raises(InputError, match=message):
            pipe.condition_on(bad, "head", request)
    with pytest.raises(InputError, match="not one of head, tail, loop"):
        pipe.condition_on(png, "middle", request)


def test_bundle_without_encoder_or_x_mask(tiny_bundle, pipe):
    text_only = Pipeline.load(tiny_bundle, verify=False)
    request = text_only.prepare_request(PROMPT, steps=1)
    with pytest.raises(BundleError, match="no VAE encoder") as e:
        text_only.condition_on(image(64, 64), "head", request)
    assert "--with-vae-encoder" in e.value.hint
    with pytest.raises(BundleError, match="no x_mask input"):
        MaskSchedule(Condition.image(np.zeros((1, 4, 1, 8, 8), np.float32), 10), seed=0, has_x_mask=False)


class OldDenoiser(TorchDenoiser):
    """A denoiser graph exported before x_mask: onnxruntime refuses unknown input names, so does this."""

    def run(self, inputs):
        if "x_mask" in inputs:
            raise ValueError("Invalid input name: x_mask")
        return super().run({**inputs, "x_mask": np.ones((len(inputs["x"]), inputs["x"].shape[2]), np.float32)})


def test_bundle_exported_before_x_mask_still_runs_text_to_video(pipe, reference):
    import dataclasses

    old = Pipeline(pipe.bundle, {**pipe.backends, "denoiser": OldDenoiser(reference.denoiser)})
    spec = old.specs["denoiser"]
    old.specs["denoiser"] = dataclasses.replace(spec, inputs=tuple(t for t in spec.inputs if t.name != "x_mask"))
    new = Pipeline(pipe.bundle, {**pipe.backends, "denoiser": TorchDenoiser(reference.denoiser)})
    request = old.prepare_request(PROMPT, steps=2)
    y, mask = old.encode_text(request)
    noise = old.initial_noise(request)
    np.testing.assert_array_equal(old.denoise(request, y, mask, noise), new.denoise(request, y, mask, noise))
    with pytest.raises(BundleError, match="no x_mask input") as e:
        old.condition_on(image(64, 64), "head", request)
    assert "re-export" in e.value.hint


def test_cli_image_to_video_without_torch(i2v_bundle, tiny_bundle, tmp_path):
    import cv2
    from test_generate_cli import osx

    from osx.runtime.video import read_video_info

    png, broken, out = tmp_path / "ref.png", tmp_path / "notes.png", tmp_path / "clip.mp4"
    cv2.imwrite(str(png), image(120, 90))  # another size and aspect: resized to fill, centre-cropped
    broken.write_text("not an image")
    r = osx("generate", i2v_bundle, "--prompt", PROMPT, "--out", out, "--image", png, "--condition", "loop",
            "--steps", "2", "--frames", "17")
    assert r.returncode == 0, r.stderr
    assert read_video_info(out) == (17, 64, 64)
    r = osx("generate", i2v_bundle, "--prompt", PROMPT, "--out", tmp_path / "b.mp4", "--image", broken)
    assert r.returncode == 2 and "not a readable image" in r.stderr and "Traceback" not in r.stderr
    r = osx("generate", tiny_bundle, "--prompt", PROMPT, "--out", tmp_path / "c.mp4", "--image", png, "--steps", "1")
    assert r.returncode == 2 and "--with-vae-encoder" in r.stderr and "Traceback" not in r.stderr


def test_shim_image_options(i2v_bundle, pipe, tmp_path):
    import json

    import cv2

    from osx.runtime import shim

    png = tmp_path / "ref.png"
    cv2.imwrite(str(png), image(64, 64)[:, :, ::-1])
    h = shim.open_bundle(str(i2v_bundle), '{"verify": false}')
    try:
        options = {"steps": 2, "num_frames": 17, "seed": 3}
        status, data, shape = shim.generate_to_buffer(h, PROMPT, json.dumps({**options, "image": str(png), "condition": "tail"}))
        assert status == shim.OK, shim.last_error()
        direct = pipe.generate(PROMPT, **options, image=png, condition="tail")
        np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(shape), direct)
        (tmp_path / "bad.png").write_text("no")
        status = shim.generate_to_buffer(h, PROMPT, json.dumps({**options, "image": str(tmp_path / "bad.png")}))[0]
        assert status == shim.ERR_INPUT and "not a readable image" in shim.last_error()
    finally:
        shim.close(h)
