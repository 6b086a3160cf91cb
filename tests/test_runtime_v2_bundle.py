"""The exported tiny Open-Sora v2.0 bundle run by the runtime with torch made unimportable (`Pipeline.load`,
`osx generate`, the shim), against the torch reference (`reference_generate_v2`) with the same noise.

The runtime process records the token ids, the text states, every denoiser call's inputs and output, the latent
after every step, the frames, and its VAE decode of the reference's final latent. Checked stage by stage:
  * token ids equal; T5 and CLIP states within 1e-5 relative;
  * every denoiser call of the run (onnxruntime) vs the torch MMDiT on the same inputs: 1e-4 relative
    (measured 4e-6); the sampler arithmetic around the calls equals the torch reference's bit for bit
    (tests/test_runtime_sampler_v2.py);
  * the runtime's tiled VAE decode of the reference's final latent: within 1 uint8 level.
Then the free run, end to end, which depends on the bundle's reference dtype (SamplerV2Config.reference_dtype):
  * fp32 (the session bundle, `osx export --reference-dtype fp32`): the loop rounds nothing, so the float32
    differences of the calls stay float32-sized: issue 15's latents within 1e-4 relative after EVERY step of
    the whole run, frames within 1 uint8 level (measured: see the test);
  * bf16 (Open-Sora's loop; the denoiser exported again at bf16, the bundle's other components reused): the
    loop rounds x and every update to bf16, so onnxruntime's float32 rounding (1e-7, another summation order)
    moves an element by one bf16 step (2^-8) now and then, and 7.5x guidance carries the moves on. The same
    torch modules at batch 2 instead of 3 drift the same way (measured: 1.8e-3 after 12 steps, frames 1 level
    apart). Measured: 3.0e-3 relative after 12 steps (64 px), frames 2 levels apart; limits 1e-2 and 3
    levels: the 1e-4 / 1 level of issue 15 is not reachable in bf16.
"""

import dataclasses
import json
import textwrap

import numpy as np
import pytest

from no_torch import BLOCK, CLI, run_without_torch
from osx.models_v2 import OPENSORA_V2_0_TINY as TINY
from osx.runtime.video import read_video_info

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::osx.runtime.tokenizer.PromptTruncatedWarning")]
PROMPT = "a red fox in the snow"
RUN = BLOCK + textwrap.dedent("""
    import dataclasses
    import json
    import numpy as np
    from osx.bundle import Bundle
    from osx.runtime import Pipeline, to_uint8_frames
    from osx.runtime.backends import create_backend

    bundle, out, kw, given = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), np.load(sys.argv[4])
    pipe = Pipeline.load(bundle)
    if len(sys.argv) > 5:  # a denoiser exported alone (another reference dtype) in place of the bundle's
        other = Bundle.open(sys.argv[5])
        pipe.backends["denoiser"] = create_backend(other, "denoiser")
        pipe.sampler = dataclasses.replace(pipe.sampler, reference_dtype=other.manifest.scheduler["reference_dtype"])
    denoiser, calls = pipe.backends["denoiser"], []
    run = denoiser.run
    copied = lambda arrays: {k: np.array(a) for k, a in arrays.items()}  # the sampler reuses its buffers in place
    denoiser.run = lambda inputs: calls.append((copied(inputs), copied(out := run(inputs)))) or out
    request = pipe.prepare_request(PROMPT, **kw)
    txt, y_vec = pipe.encode_text(request)
    latent = pipe.denoise(request, txt, y_vec)
    frames = to_uint8_frames(pipe.decode(latent, request.num_frames))
    decoded = to_uint8_frames(pipe.decode(given["latent"], request.num_frames))  # the reference's latent
    ids = {f"{n}_ids": t.encode(pipe.text_rows(request))[0] for n, t in pipe.tokenizers.items()}
    np.savez(out, txt=txt, y_vec=y_vec, latent=latent, frames=frames, decoded=decoded, height=request.height, width=request.width,
             num_frames=request.num_frames, steps=request.steps, seed=request.seed, **ids,
             **{f"call{i}_{k}": v for i, (inputs, outputs) in enumerate(calls) for k, v in {**inputs, **outputs}.items()})
    check_no_torch()
    print(type(pipe).__name__, pipe.sampler.reference_dtype)
""").replace("PROMPT", repr(PROMPT))
BF16_DRIFT, BF16_FRAMES = 1e-2, 3  # the bf16 loop's whole-run bounds (module docstring: measured 3.0e-3, 2 levels)
FP32_DRIFT, FP32_FRAMES = 1e-4, 1  # issue 15's whole-run bounds, met at reference dtype fp32


def python(*args, script=CLI):
    return run_without_torch(script, *args)


@pytest.fixture(scope="module")
def v2_bundle(tiny_v2_bundle):
    return tiny_v2_bundle


@pytest.fixture(scope="module")
def bf16_denoiser(tmp_path_factory):
    """The tiny MMDiT exported alone at reference dtype bf16 (Open-Sora's; the session bundle is fp32)."""
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    out = tmp_path_factory.mktemp("bundles") / "tiny-v2-bf16-denoiser"
    export_bundle(ExportRequest(TINY.name, out, RANDOM_WEIGHTS, gpu="cpu", only=("denoiser",), reference_dtype="bf16",
                                progress=lambda msg: None))
    return out


def reference_model(reference_dtype: str):
    """The torch model the bundle was exported from (same config, same seeded weights), float32 weights."""
    from osx.export.pipeline_v2 import build_reference_v2

    cfg = dataclasses.replace(TINY, sampler=dataclasses.replace(TINY.sampler, reference_dtype=reference_dtype))
    return build_reference_v2(cfg, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(v2_bundle):
    from osx.bundle import Bundle

    cfg = Bundle.open(v2_bundle).manifest.model_config()
    assert cfg.sampler.reference_dtype == "fp32"  # what `--reference-dtype fp32` recorded
    return reference_model("fp32")


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@torch.no_grad()
def torch_denoiser(reference, inputs):
    """The torch MMDiT on one recorded denoiser call (the image tokens' RoPE tables as given; the text rows'
    rotation is the identity, which the exported graph adds)."""
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    L = t["txt"].shape[1]
    cos = torch.cat([torch.ones(L, t["rope_cos"].shape[1]), t["rope_cos"]])[None]
    sin = torch.cat([torch.zeros(L, t["rope_sin"].shape[1]), t["rope_sin"]])[None]
    return reference.mmdit(t["img"], t["txt"], t["timestep"], t["y_vec"], t["cond"], cos, sin).float().numpy()


def run_both(bundle, reference, tmp_path, kw, denoiser=None):
    """The torch reference and the torch-free runtime on the same request; checks every stage up to the free
    run (module docstring) and returns (latent errors after every step, max frame difference)."""
    from osx.export.pipeline_v2 import reference_generate_v2
    from osx.models_v2 import image_size
    from osx.runtime.sampler_v2 import unpack

    d = TINY.defaults
    height, width = image_size(TINY, kw.get("resolution", d.resolution), kw.get("aspect_ratio", d.aspect_ratio))
    want = reference_generate_v2(reference, PROMPT, height=height, width=width, num_frames=kw.get("num_frames", d.num_frames),
                                 num_steps=kw.get("steps", TINY.sampler.num_steps), seed=kw.get("seed", d.seed),
                                 negative_prompt=kw.get("negative_prompt"))
    np.savez(tmp_path / "given.npz", latent=want.latent)
    r = python(bundle, tmp_path / "run.npz", json.dumps(kw), tmp_path / "given.npz", *([denoiser] if denoiser else []), script=RUN)
    assert r.returncode == 0, r.stderr
    # Pipeline.load picked the v2.0 pipeline by the bundle's family; it runs the reference's dtype
    assert r.stdout.split()[-2:] == ["PipelineV2", reference.cfg.sampler.reference_dtype]
    got = np.load(tmp_path / "run.npz")
    steps = len(want.latents)
    assert (int(got["height"]), int(got["width"]), int(got["steps"])) == (height, width, steps)
    # text: token ids of both tokenizers, then T5 and CLIP states
    assert np.array_equal(got["text_encoder_ids"], want.t5_ids[:2]) and np.array_equal(got["clip_ids"], want.clip_ids[:2])
    assert rel(got["txt"], want.txt[:2]) < 1e-5 and rel(got["y_vec"], want.y_vec[:2]) < 1e-5
    # every denoiser call of the run against the torch MMDiT on the same inputs: 1e-4 relative
    calls = [{k.split("_", 1)[1]: got[k] for k in got.files if k.startswith(f"call{i}_")} for i in range(steps)]
    assert [c["img"].shape[0] for c in calls] == [2] * steps  # t2v: prompt and negative rows in one call
    call_errors = [rel(c["v"], torch_denoiser(reference, {k: v for k, v in c.items() if k != "v"})) for c in calls]
    assert max(call_errors) < 1e-4, call_errors
    # the runtime's VAE decode (tiled at 96 px) of the reference's latent: within 1 uint8 level
    assert got["decoded"].shape == want.frames.shape
    assert np.abs(got["decoded"].astype(int) - want.frames).max() <= 1
    # the free run: the latent after every step, then the frames
    T, h, w = want.latent.shape[2:]
    latents = [unpack(c["img"][:1], T, h // 2, w // 2) for c in calls[1:]] + [got["latent"]]
    errors = [rel(a, b) for a, b in zip(latents, want.latents)]
    frames = int(np.abs(got["frames"].astype(int) - want.frames).max())
    print(reference.cfg.sampler.reference_dtype, "LATENT", [f"{e:.1e}" for e in errors], "CALLS", f"{max(call_errors):.1e}",
          "FRAMES", frames)
    return errors, frames


SIZES = [{}, {"resolution": "96px", "aspect_ratio": "1:1", "num_frames": 5, "steps": 6, "seed": 3, "negative_prompt": "blurry"}]


@pytest.mark.parametrize("kw", SIZES, ids=["64px-9f", "96px-tiled-5f"])
def test_runtime_without_torch_matches_the_reference_over_the_whole_run(v2_bundle, reference, tmp_path, kw):
    """Issue 15's test: reference dtype fp32, latents within 1e-4 relative after every step, frames within 1 level."""
    errors, frames = run_both(v2_bundle, reference, tmp_path, kw)
    assert max(errors) < FP32_DRIFT, errors
    assert frames <= FP32_FRAMES


def test_bf16_loop_drifts_within_its_stated_bound(v2_bundle, bf16_denoiser, tmp_path):
    """Open-Sora's bf16 loop over the bf16 denoiser graph: every call within 1e-4, the whole run within the
    bf16 drift of the module docstring (1e-2 relative, 3 uint8 levels), not the 1e-4 of issue 15."""
    errors, frames = run_both(v2_bundle, reference_model("bf16"), tmp_path, SIZES[0], denoiser=bf16_denoiser)
    assert max(errors) < BF16_DRIFT, errors
    assert frames <= BF16_FRAMES


def test_the_exported_denoiser_follows_the_reference_dtype(v2_bundle, bf16_denoiser, reference):
    """The two graphs round the timestep (t and 1000*t) as their setting says: each within 1e-4 of its own
    torch MMDiT, and more than 1e-3 apart from each other at a t that bf16 moves."""
    from osx.bundle import Bundle
    from osx.models_v2 import rope_tables
    from osx.runtime.backends import create_backend

    spec = Bundle.open(v2_bundle).spec("denoiser")
    feed = spec.sample_inputs({"batch": 2, "tokens": 12}, seed=0)
    feed.update(timestep=np.array([0.9964526, 0.33266], np.float32), **dict(zip(("rope_cos", "rope_sin"), rope_tables(TINY.mmdit, 1, 3, 4))))
    outs = {}
    for d, path, model in (("fp32", v2_bundle, reference), ("bf16", bf16_denoiser, reference_model("bf16"))):
        outs[d] = create_backend(Bundle.open(path), "denoiser").run(feed)["v"]
        assert Bundle.open(path).manifest.scheduler["reference_dtype"] == d
        assert rel(outs[d], torch_denoiser(model, feed)) < 1e-4, d
    assert rel(outs["fp32"], outs["bf16"]) > 1e-3


def test_osx_generate_without_torch(v2_bundle, tmp_path):
    out = tmp_path / "fox.mp4"
    r = python("generate", v2_bundle, "--prompt", PROMPT, "--out", out, "--resolution", "96px", "--aspect-ratio", "16:9",
               "--num-frames", "9", "--steps", "2", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert read_video_info(out) == (9, 64, 128)
    assert r.stdout.strip().splitlines()[-1].startswith(f"wrote {out}: 9 frames, 128x64, 24 fps")
    assert "it/s" in r.stderr and "decoded in 6 VAE call(s)" in r.stderr  # latent 8x16 in 8x8 tiles every 6: 2 x 3


@pytest.mark.parametrize("args,message", [
    (["--num-frames", "6"], "num_frames=6: opensora-v2.0-tiny takes 4k+1 frames from 1 to 33"),
    (["--resolution", "100x64"], "100x64 (WxH) is not one of opensora-v2.0-tiny's sizes"),
    (["--resolution", "256px"], "unknown resolution '256px' for opensora-v2.0-tiny"),
    (["--aspect-ratio", "wide"], "aspect ratio 'wide' is not W:H"),
    (["--resolution", "64x64", "--aspect-ratio", "1:1"], "not both"),
])
def test_osx_generate_refuses_bad_v2_requests(v2_bundle, tmp_path, args, message):
    out = tmp_path / "a.mp4"
    r = python("generate", v2_bundle, "--prompt", "x", "--out", out, *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "hint: " in r.stderr  # what to do instead
    assert not out.exists()


def test_a_bundle_of_an_unknown_family_is_refused(v2_bundle, tmp_path):
    import shutil

    copy = tmp_path / "other"
    shutil.copytree(v2_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["family"] = "opensora-v3.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    r = python("generate", copy, "--prompt", "x", "--out", tmp_path / "a.mp4")
    assert r.returncode == 2 and "model family 'opensora-v3.0' is not one this osx knows" in r.stderr, r.stderr


def test_shim_runs_a_v2_bundle_unchanged(v2_bundle):
    from osx.runtime import shim
    from osx.runtime.pipeline import Pipeline

    handle = shim.open_bundle(str(v2_bundle), '{"verify": false}')
    assert handle >= 1, shim.last_error()
    events = []
    assert shim.set_progress_callback(handle, lambda line: events.append(json.loads(line))) == shim.OK
    options = {"num_frames": 5, "height": 64, "width": 64, "steps": 2, "seed": 1, "negative_prompt": "blurry"}
    status, data, shape = shim.generate_to_buffer(handle, PROMPT, json.dumps(options))
    assert status == shim.OK and shape == (5, 64, 64, 3), shim.last_error()
    assert [e["phase"] for e in events] == ["text_encoder"] * 2 + ["denoise"] * 2 + ["vae_decode"]
    frames = np.frombuffer(data, np.uint8).reshape(shape)
    assert np.array_equal(frames, Pipeline.load(v2_bundle, verify=False).generate(PROMPT, **options))
    status, _, _ = shim.generate_to_buffer(handle, PROMPT, json.dumps({"num_frames": 6}))
    assert status == shim.ERR_INPUT and "4k+1" in shim.last_error()
    assert shim.close(handle) == shim.OK


def test_bundle_info_names_the_v2_sizes(v2_bundle):
    r = python("bundle", "info", v2_bundle)
    assert r.returncode == 0, r.stderr
    assert "generate  sizes 64px 16:9 = 80x48 (WxH)" in r.stdout and "frames 1, 5, ..., 33 (4k+1)" in r.stdout
