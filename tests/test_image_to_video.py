"""Image-to-video, video continuation and extension on v1.2 bundles: reference preprocessing, the mask
strategy, runtime vs torch reference.

Tolerances: NumPy image preprocessing vs PIL + torch within 1 uint8 level (PIL resamples in fixed point,
the NumPy path in float64); NumPy video preprocessing vs torch's bilinear interpolate within 2^-18 (torch
rounds in float32); the NumPy mask loop driven by the torch STDiT3 matches the torch sampler's mask strategy
to 1e-4 relative per step (float32, summation order only); the all-ONNX pipeline matches reference_generate
to 1e-4 relative on the latent of every mode and clip, the pixel frames of held latent frames to 1 uint8
level and every frame to 2.
"""

import numpy as np
import pytest

from osx.errors import BundleError, InputError
from osx.runtime import scheduler as rf
from osx.runtime.conditioning import Condition, MaskSchedule, load_image, preprocess, preprocess_video
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


@pytest.mark.parametrize("src,dst", [((37, 53), (64, 80)), ((300, 200), (64, 96)), ((64, 64), (64, 64)), ((90, 160), (48, 48))])
def test_preprocess_video_matches_torch(src, dst):
    from osx.export.pipeline import reference_preprocess_video

    frames = np.stack([image(*src, seed=s) for s in range(3)])
    got = preprocess_video(frames, *dst)
    want = reference_preprocess_video(frames, *dst).numpy()
    assert got.shape == want.shape == (3, 3, *dst) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 2**-18  # torch interpolates in float32: a few ulps at 1


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
def i2v_bundle(tiny_bundle):
    """The demo bundle: `osx export` includes the VAE encoder where the family takes references."""
    assert "vae_encoder" in Pipeline.load(tiny_bundle, verify=False).backends
    return tiny_bundle


@pytest.fixture(scope="module")
def text_only_bundle(tiny_bundle, tmp_path_factory):
    """The demo bundle as one exported with --without-vae-encoder (its manifest names no VAE encoder)."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("bundles") / "text-only"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def pipe(i2v_bundle):
    return Pipeline.load(i2v_bundle)


@pytest.fixture(scope="module")
def reference(pipe):
    from osx.export.reference import build_reference

    return build_reference(pipe.model)


@pytest.mark.parametrize("where", ["head", "tail", "loop"])
def test_numpy_mask_loop_matches_torch_sampler(pipe, reference, where):
    from osx.export.sampler import sample

    request = pipe.prepare_request(PROMPT, steps=5, seed=2)
    lh, lw = pipe.latent_shape(request)[3:]
    cond = pipe.condition_on(image(8 * lh, 8 * lw), where, request)
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
    held = cond.mask == 0
    assert held.sum() == (2 if where == "loop" else 1)
    np.testing.assert_array_equal(final[:, :, held], cond.latent[:, :, held])  # the conditioned frames are held exactly


@pytest.mark.parametrize("where", ["head", "tail", "loop"])
def test_image_to_video_matches_reference(pipe, reference, where):
    from osx.export.pipeline import reference_generate

    request = pipe.prepare_request(PROMPT, steps=4)
    shape = pipe.latent_shape(request)
    img = image(8 * shape[3], 8 * shape[4], seed=4)  # the target size: both paths see the same pixels
    noise = rf.initial_noise(9, shape)
    want = reference_generate(reference, PROMPT, noise=noise, steps=4, image=img, condition=where)
    frames = pipe.generate(PROMPT, steps=4, noise=noise, image=img, condition=where)
    text_only = pipe.generate(PROMPT, steps=4, noise=noise)
    assert frames.shape == want.frames.shape
    # the pixel frames of the held latent frames: the first one; the last latent frame's 4
    held = {"head": [0], "tail": list(range(-4, 0)), "loop": [0, -4, -3, -2, -1]}[where]
    assert np.abs(frames[held].astype(int) - want.frames[held]).max() <= 1
    assert np.abs(frames.astype(int) - want.frames).max() <= 2
    assert np.abs(frames[held].astype(int) - text_only[held]).mean() > 5  # the image did change the video
    latent = pipe.denoise(request, *pipe.encode_text(request), noise, condition=pipe.condition_on(img, where, request))
    assert relative(latent, want.latent) < 1e-4


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


def test_bundle_without_encoder_or_x_mask(text_only_bundle, pipe):
    text_only = Pipeline.load(text_only_bundle, verify=False)
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


def test_cli_image_to_video_without_torch(i2v_bundle, text_only_bundle, tmp_path):
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
    r = osx("generate", text_only_bundle, "--prompt", PROMPT, "--out", tmp_path / "c.mp4", "--image", png, "--steps", "1",
            "--no-verify")
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
        from osx.runtime.video import write_video

        mp4 = write_video(video(17, 64, 64), tmp_path / "ref.mp4", 24)
        continued = {"steps": 1, "num_frames": 34, "seed": 3, "video": str(mp4), "extend": 1}
        status, data, shape = shim.generate_to_buffer(h, PROMPT, json.dumps(continued))
        assert status == shim.OK, shim.last_error()
        np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(shape), pipe.generate(PROMPT, **continued))
        status = shim.generate_to_buffer(h, PROMPT, json.dumps({**continued, "video": str(png)}))[0]
        assert status == shim.ERR_INPUT and "not a video" in shim.last_error()
        (tmp_path / "bad.png").write_text("no")
        status = shim.generate_to_buffer(h, PROMPT, json.dumps({**options, "image": str(tmp_path / "bad.png")}))[0]
        assert status == shim.ERR_INPUT and "not a readable image" in shim.last_error()
    finally:
        shim.close(h)


def video(frames, h, w, seed=0):  # a moving pattern: each frame shifted by one more pixel
    return np.stack([np.roll(image(h, w, seed), f, axis=1) for f in range(frames)])


def test_continue_video_matches_reference(pipe, reference):
    from osx.export.pipeline import reference_generate

    request = pipe.prepare_request(PROMPT, steps=3)  # 34 frames: 10 latent frames, the first 5 held
    noise = rf.initial_noise(4, pipe.latent_shape(request))
    ref_video = video(34, 48, 80)  # another size and aspect: resized to fill, centre-cropped
    want = reference_generate(reference, PROMPT, noise=noise, steps=3, video=ref_video)
    frames = pipe.generate(PROMPT, steps=3, noise=noise, video=ref_video)
    assert frames.shape == want.frames.shape == (34, 64, 64, 3)
    assert np.abs(frames[:17].astype(int) - want.frames[:17]).max() <= 1  # the held chunk
    assert np.abs(frames.astype(int) - want.frames).max() <= 2
    cond = pipe.continue_video(ref_video, request)
    np.testing.assert_array_equal(cond.mask, [0] * 5 + [1] * 5)
    latent = pipe.denoise(request, *pipe.encode_text(request), noise, condition=cond)
    assert relative(latent, want.latent) < 1e-4
    np.testing.assert_array_equal(latent[:, :, :5], cond.latent[:, :, :5])
    # only the video's last 17 frames count
    np.testing.assert_array_equal(pipe.continue_video(ref_video[-17:], request).latent, cond.latent)


def test_extension_continues_each_clip_and_matches_reference(pipe, reference):
    from osx.export.pipeline import reference_generate

    request = pipe.prepare_request(PROMPT, steps=2, seed=6)
    runner = Pipeline(pipe.bundle, pipe.backends)
    latents = []
    denoise = runner.denoise
    runner.denoise = lambda *a, **k: latents.append(denoise(*a, **k)) or latents[-1]
    events = []
    frames = runner.run(request, extend=2, progress=events.append)
    assert frames.shape == (34 + 2 * 17, 64, 64, 3)
    np.testing.assert_array_equal(frames[:34], pipe.run(request))  # the first clip is the plain one
    for k in (1, 2):  # clip k holds the VAE latent of clip k-1's last 17 decoded frames at its first 5
        previous = runner.decode(latents[k - 1], 34)
        np.testing.assert_array_equal(latents[k][:, :, :5], runner.encode_reference(previous[:, -17:]))
        assert np.abs(latents[k][:, :, 5:] - latents[k - 1][:, :, 5:]).mean() > 0.1  # new content, not a copy
    assert [(e["clip"], e["step"]) for e in events if e["phase"] == "denoise"] == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert [e["clip"] for e in events if e["phase"] == "vae_encode"] == [2, 3]  # each later clip encodes its head
    want = reference_generate(reference, PROMPT, steps=2, seed=6, extend=2)
    for a, b in zip(latents, want.clip_latents, strict=True):
        assert relative(a, b) < 1e-4
    assert np.abs(frames.astype(int) - want.frames).max() <= 2


def test_a_reference_reports_its_encoding_first(pipe):
    """Phase "vae_encode" (osx.runtime.progress): the reference is encoded before the text, as announced."""
    request = pipe.prepare_request(PROMPT, steps=1, num_frames=17)
    events = []
    pipe.run(request, image=image(64, 64), progress=events.append)
    announced = pipe.progress_phases(request, reference=True)
    assert [(e["phase"], e["step"], e["total"]) for e in events] == [(p, k, n) for p, n in announced for k in range(1, n + 1)]
    assert announced[0] == ("vae_encode", 1) and pipe.progress_phases(request)[0] == ("text_encoder", 1)


def test_bad_video_references(pipe, tmp_path):
    import cv2

    from osx.runtime.video import write_video

    request = pipe.prepare_request(PROMPT, steps=1)
    good = write_video(video(20, 32, 48), tmp_path / "ref.mp4", 24)
    np.testing.assert_array_equal(pipe.continue_video(good, request).mask, [0] * 5 + [1] * 5)
    cv2.imwrite(str(tmp_path / "still.png"), image(32, 32))
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really")
    (tmp_path / "notes.mp4").write_text("hello")
    for bad, message in [(tmp_path / "broken.mp4", "not a readable video"), (tmp_path / "notes.mp4", "not a readable video"),
                         (tmp_path / "still.png", "not a video|still image"), (tmp_path / "missing.mp4", "does not exist"),
                         (np.zeros((4, 4, 3), np.uint8), "expected uint8 \\[F, H, W, 3\\]")]:
        with pytest.raises(InputError, match=message):
            pipe.continue_video(bad, request)
    with pytest.raises(InputError, match="not a readable image"):  # a video where an image belongs
        pipe.condition_on(good, "head", request)
    short = pipe.prepare_request(PROMPT, steps=1, num_frames=17)  # 5 latent frames: all of them would be held
    with pytest.raises(InputError, match="holds the first 5 latent frames"):
        pipe.continue_video(good, short)
    with pytest.raises(InputError, match="holds the first 5 latent frames"):
        pipe.run(short, extend=1)
    for bad in (-1, 17, 1.5, "2"):
        with pytest.raises(InputError, match="extend"):
            pipe.run(request, extend=bad)
    with pytest.raises(InputError, match="both given"):
        pipe.run(request, image=image(8, 8), video=good)
    with pytest.raises(InputError, match="continued at the head"):
        pipe.run(request, video=good, condition="tail")


def test_cli_video_and_extend(i2v_bundle, tmp_path):
    import json

    from test_generate_cli import osx

    from osx.runtime.video import read_video_info, write_video

    ref = write_video(video(40, 48, 64), tmp_path / "ref.mp4", 24)
    out = tmp_path / "clip.mp4"
    r = osx("generate", i2v_bundle, "--prompt", PROMPT, "--out", out, "--video", ref, "--extend", "1", "--steps", "1",
            "--frames", "34", "--progress-json")
    assert r.returncode == 0, r.stderr
    assert read_video_info(out) == (51, 64, 64)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["clip"] for e in events if e.get("phase") == "denoise"] == [1, 2] and events[-1]["frames"] == 51
    assert [e["clip"] for e in events if e.get("phase") == "vae_encode"] == [1, 2] and events[0]["phase"] == "vae_encode"
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    for args, message in [(["--video", broken], "not a readable video"), (["--video", ref, "--image", ref], "not both"),
                          (["--video", tmp_path / "nope.mp4"], "does not exist"), (["--extend", "99"], "extend=99")]:
        r = osx("generate", i2v_bundle, "--prompt", PROMPT, "--out", tmp_path / "b.mp4", *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
