"""Every Open-Sora v2.0 reference mode over the EXPORTED tiny bundle (reference dtype fp32), run by the runtime with
torch made unimportable, against the torch reference (`reference_generate_v2`) with the same seed and reference.

The runtime preprocesses the reference, encodes it with the exported VAE encoder (onnxruntime, per tile), builds
the cond channels and runs the guided loop over the exported MMDiT; the reference does all of it in torch.
Tolerances (issue 16's): the latent after every step within 1e-4 relative (the write-back included), every frame
within 1 uint8 level, so the conditioned frames that i2v overwrites too. One runtime process runs every mode (one
bundle load); each test checks one mode at the smallest size (64 px) and 2 steps.

v2v_*_easy hold 65 frames, and the tiny model declares 33 at most: they run on a copy of the bundle whose manifest
declares 65 (the same graph files: their frame and token axes are dynamic) next to a reference model that does too.
"""

import dataclasses
import json
import textwrap

import numpy as np
import pytest

from no_torch import BLOCK, run_without_torch

torch = pytest.importorskip("torch")
from test_runtime_v2_bundle import reference_model, rel  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::osx.runtime.tokenizer.PromptTruncatedWarning")]
PROMPT = "a lighthouse on a cliff"
STEPS, SEED = 2, 4
MODES = {  # mode: (frames of the clip, reference frames: 0 = an image)
    "i2v_head": (9, 0), "i2v_tail": (9, 0), "i2v_loop": (9, 0), "v2v_head": (33, 40), "v2v_tail": (33, 40),
    "v2v_head_easy": (65, 70), "v2v_tail_easy": (65, 70),
}
HELD = {"i2v_head": [0], "i2v_tail": [-1], "i2v_loop": [0, -1]}  # the frames i2v overwrites with the reference
RUN = BLOCK + textwrap.dedent("""
    import json
    import numpy as np
    from osx.runtime import Pipeline, to_uint8_frames
    from osx.runtime.sampler_v2 import unpack

    out, jobs, pipes = sys.argv[1], json.loads(sys.argv[2]), {}
    for job in jobs:
        if job["bundle"] not in pipes:
            pipe = pipes[job["bundle"]] = Pipeline.load(job["bundle"])
            denoiser, pipe.calls = pipe.backends["denoiser"], []
            denoiser.run = lambda inputs, run=denoiser.run, calls=pipe.calls: calls.append(inputs["img"][:1]) or run(inputs)
        pipe = pipes[job["bundle"]]
        request = pipe.prepare_request(PROMPT, num_frames=job["frames"], steps=job["steps"], seed=job["seed"])
        cond = pipe.reference_condition(request, condition=job["where"], **{job["kind"]: np.load(job["reference"])})
        del pipe.calls[:]
        latent = pipe.denoise(request, *pipe.encode_text(request), None, None, cond)
        _, _, T, h, w = latent.shape
        per_step = len(pipe.calls) // request.steps
        latents = [unpack(x, T, h // 2, w // 2) for x in pipe.calls[per_step::per_step]] + [latent]
        frames = to_uint8_frames(pipe.decode(latent, request.num_frames))
        np.savez(f"{out}/{job['mode']}.npz", latents=np.stack(latents), frames=frames, masks=cond[1], cond_type=cond[0])
    check_no_torch()
""").replace("PROMPT", repr(PROMPT))


def picture(h=64, w=64, seed=1):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 5 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def reference_of(mode):
    frames = MODES[mode][1]
    return np.stack([np.roll(picture(), f, axis=1) for f in range(frames)]) if frames else picture()


@pytest.fixture(scope="module")
def bundle65(tiny_v2_bundle, tmp_path_factory):
    """The session bundle's files (links) under a manifest declaring 65 frames (model config and I/O ranges)."""
    from osx.bundle import Bundle
    from osx.families import component_specs

    root = tmp_path_factory.mktemp("bundles") / "tiny-v2-65"
    root.mkdir()
    for f in tiny_v2_bundle.iterdir():
        if f.name != "manifest.json":
            (root / f.name).symlink_to(f)
    manifest = json.loads((tiny_v2_bundle / "manifest.json").read_text())
    cfg = dataclasses.replace(Bundle.open(tiny_v2_bundle, verify=False).manifest.model_config(), max_frames=65)
    manifest["model"]["config"] = cfg.to_dict()
    for name, spec in component_specs(cfg).items():
        if name in manifest["components"]:
            manifest["components"][name]["io"] = spec.to_dict()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def runtime(tiny_v2_bundle, bundle65, tmp_path_factory):
    """{mode: the torch-free runtime's latents after every step, frames, masks} of every mode, one process."""
    tmp = tmp_path_factory.mktemp("i2v-v2-bundle")
    jobs = []
    for mode, (frames, _) in MODES.items():
        np.save(tmp / f"{mode}-reference.npy", reference_of(mode))
        kind, where = mode.split("_", 1)
        jobs.append({"mode": mode, "bundle": str(bundle65 if mode.endswith("_easy") else tiny_v2_bundle), "frames": frames,
                     "steps": STEPS, "seed": SEED, "kind": "image" if kind == "i2v" else "video", "where": where,
                     "reference": str(tmp / f"{mode}-reference.npy")})
    r = run_without_torch(RUN, tmp, json.dumps(jobs))
    assert r.returncode == 0, r.stderr
    return {mode: np.load(tmp / f"{mode}.npz") for mode in MODES}


@pytest.fixture(scope="module")
def models():
    fp32 = reference_model("fp32")
    return {33: fp32, 65: dataclasses.replace(fp32, cfg=dataclasses.replace(fp32.cfg, max_frames=65))}


@pytest.mark.parametrize("mode", MODES)
def test_mode_over_the_exported_bundle_matches_the_reference(runtime, models, mode):
    from osx.export.pipeline_v2 import reference_generate_v2

    frames = MODES[mode][0]
    got = runtime[mode]
    want = reference_generate_v2(models[65 if mode.endswith("_easy") else 33], PROMPT, cond_type=mode,
                                 references=[reference_of(mode)], height=64, width=64, num_frames=frames,
                                 num_steps=STEPS, seed=SEED)
    assert str(got["cond_type"]) == mode and np.array_equal(got["masks"], want.masks) and want.masks.any()
    errors = [rel(a, b) for a, b in zip(got["latents"], want.latents[:-1] + [want.latent], strict=True)]
    levels = np.abs(got["frames"].astype(int) - want.frames).max(axis=(1, 2, 3))
    print(mode, "LATENT", [f"{e:.1e}" for e in errors], "FRAMES", levels.max())
    assert max(errors) < 1e-4, errors
    assert got["frames"].shape == want.frames.shape == (frames, 64, 64, 3)
    assert levels[HELD.get(mode, slice(None))].max() <= 1 and levels.max() <= 1


def test_osx_generate_takes_the_easy_modes(tiny_v2_bundle, bundle65, tmp_path):
    """`--video --condition tail_easy` without torch: 65 reference frames hold 17 latent frames of a 65-frame clip;
    a clip too short for them is refused before anything is encoded (exit 2)."""
    from test_runtime_v2_bundle import python

    from osx.runtime.video import read_video_info, write_video

    ref = write_video(np.stack([np.roll(picture(), f, axis=1) for f in range(70)]), tmp_path / "ref.mp4", 24)
    out = tmp_path / "clip.mp4"
    r = python("generate", bundle65, "--prompt", PROMPT, "--out", out, "--video", ref, "--condition", "tail_easy",
               "--num-frames", "65", "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert read_video_info(out) == (65, 64, 64)
    r = python("generate", tiny_v2_bundle, "--prompt", PROMPT, "--out", tmp_path / "short.mp4", "--video", ref,
               "--condition", "head_easy", "--num-frames", "33")
    assert r.returncode == 2 and "v2v_head_easy conditions 17 latent frames; the video has 9" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "short.mp4").exists()
