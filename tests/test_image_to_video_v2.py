"""Image- and video-conditioned Open-Sora v2.0 runs (runtime/pipeline_v2.py) against the torch reference.

PipelineV2 runs over the reference's own torch modules (tests/test_runtime_pipeline_v2.py's backends, plus
the VAE encoder per tile as the exported graph computes it), one batch row at a time, so the NumPy side does
everything but the model arithmetic: the reference's preprocessing, the tiled encode, the cond channels
(mask + reference latents), the three guidance rows with the image guidance and its ramps (i2v), the
write-back of the reference latent (i2v). Tolerance: 1e-4 relative on every step's latent, the written-back
latent frames equal, every frame within 1 uint8 level.
"""

import dataclasses

import numpy as np
import pytest

from osx.errors import BundleError, InputError
from osx.runtime.pipeline_v2 import PipelineV2
from osx.runtime.sampler_v2 import unpack

torch = pytest.importorskip("torch")
from test_runtime_pipeline_v2 import (  # noqa: E402,F401 (fixtures: the tiny reference and a bundle folder for it)
    PROMPT, TINY, TorchBackend, reference, row_by_row, torch_bundle, torch_pipeline, v2_bundle,
)
TINY65 = dataclasses.replace(TINY, max_frames=65)  # v2v_*_easy holds 65 frames (17 latent frames); the tiny model 33

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::osx.runtime.tokenizer.PromptTruncatedWarning")]


def picture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 7 + c) * np.cos(yy / 5 - c) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


def with_encoder(bundle, reference):
    """torch_pipeline plus the VAE encoder, per tile as the exported graph computes it."""
    from osx.export.adapters_v2 import encode_mean

    p = torch_pipeline(bundle, reference)
    spec = bundle.manifest.components["vae_encoder"].io
    p.backends["vae_encoder"] = TorchBackend("vae_encoder", spec, lambda video: encode_mean(reference.vae, video))
    return p


@pytest.fixture(scope="module")
def pipe(v2_bundle, reference):
    return with_encoder(v2_bundle, reference)


@pytest.fixture(scope="module")
def pipe65(reference, tmp_path_factory):
    return with_encoder(torch_bundle(reference, tmp_path_factory.mktemp("v2-65"), TINY65), reference)


def run_latents(pipe, request, **refs):
    """(latent after every step, what the VAE decodes, frames) of one conditioned run."""
    cond = pipe.reference_condition(request, **refs)
    txt, y_vec = pipe.encode_text(request)
    calls = pipe.backends["denoiser"].calls
    start = len(calls)
    _, _, T, h, w = pipe.latent_shape(request)
    pipe.backends["denoiser"].fn.grid = (T, h // 2, w // 2)
    latent = pipe.denoise(request, txt, y_vec, None, None, cond)
    per_step = (len(calls) - start) // request.steps
    latents = [unpack(c["img"][:1], T, h // 2, w // 2) for c in calls[start + per_step::per_step]]
    return latents, latent, cond


# 67 px: an odd excess of 3, which an image crops at round(1.5) = 2 and a video (Open-Sora's video transform) at 1
@pytest.mark.parametrize("mode,size,steps", [("i2v_head", (64, 64), 4), ("i2v_head", (67, 64), 4), ("i2v_tail", (64, 64), 4),
                                             ("i2v_loop", (64, 64), 4), ("v2v_head", (64, 67), 4), ("v2v_tail", (64, 64), 4),
                                             ("v2v_head_easy", (64, 64), 2), ("v2v_tail_easy", (64, 64), 2)])
def test_conditioned_runs_equal_the_torch_reference(request, row_by_row, mode, size, steps):
    from osx.export.pipeline_v2 import reference_generate_v2

    kind, where = mode.split("_", 1)
    video, easy = kind == "v2v", mode.endswith("_easy")
    pipe = request.getfixturevalue("pipe65" if easy else "pipe")
    if easy:
        row_by_row = dataclasses.replace(row_by_row, cfg=TINY65)
    frames = 65 if easy else 33
    job = pipe.prepare_request(PROMPT, steps=steps, seed=5, num_frames=frames if video else 9)
    ref = (np.stack([np.roll(picture(*size, seed=1), f, axis=1) for f in range(frames + 7)]) if video
           else picture(*size, seed=1))
    latents, latent, (cond_type, masks, _, _) = run_latents(pipe, job, **{"video" if video else "image": ref}, condition=where)
    want = reference_generate_v2(row_by_row, PROMPT, cond_type=mode, references=[ref], height=job.height,
                                 width=job.width, num_frames=job.num_frames, num_steps=job.steps, seed=job.seed)
    assert cond_type == mode and masks.any()  # conditioned frames: 1 (i2v), 2 (loop), 9 (v2v), 17 (v2v_*_easy)
    np.testing.assert_array_equal(masks, want.masks)
    assert len(latents) + 1 == len(want.latents)
    for i, (a, b) in enumerate(zip(latents + [latent], want.latents[:-1] + [want.latent])):
        assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(b), f"step {i + 1}"
    if kind == "i2v":  # the reference latent written back, as Open-Sora does before decoding
        held = {"head": [0], "tail": [-1], "loop": [0, -1]}[where]
        np.testing.assert_array_equal(latent[:, :, held], want.latent[:, :, held])
    events = []
    frames = pipe.generate(PROMPT, steps=steps, seed=5, num_frames=job.num_frames, condition=where,
                           progress=events.append, **{"video" if video else "image": ref})
    announced = pipe.progress_phases(job, reference=True)  # the reference's encoding first
    assert [(e["phase"], e["step"]) for e in events] == [(p, k) for p, n in announced for k in range(1, n + 1)]
    assert frames.shape == want.frames.shape
    held_frames = {"head": [0], "tail": [-1], "loop": [0, -1]}[where] if kind == "i2v" else slice(None)
    assert np.abs(frames[held_frames].astype(int) - want.frames[held_frames]).max() <= 1
    assert np.abs(frames.astype(int) - want.frames).max() <= 1


def test_references_refused_clearly(pipe, v2_bundle, reference):
    request = pipe.prepare_request(PROMPT, steps=1)
    with pytest.raises(InputError, match="not one of head, tail, head_easy, tail_easy for a reference video"):
        pipe.reference_condition(request, video=np.zeros((40, 8, 8, 3), np.uint8), condition="loop")
    with pytest.raises(InputError, match="at least 33 frames, got 20"):
        pipe.reference_condition(request, video=np.zeros((20, 8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="v2v_tail_easy needs a reference video of at least 65 frames, got 64"):
        pipe.reference_condition(request, video=np.zeros((64, 8, 8, 3), np.uint8), condition="tail_easy")
    short = pipe.prepare_request(PROMPT, steps=1, num_frames=33)  # 9 latent frames; *_easy holds 17
    encoder = pipe.backends["vae_encoder"]
    calls = len(encoder.calls)
    with pytest.raises(InputError, match="conditions 17 latent frames; the video has 9") as e:
        pipe.reference_condition(short, video=np.zeros((65, 8, 8, 3), np.uint8), condition="head_easy")
    assert "at least 65 frames" in e.value.hint and len(encoder.calls) == calls  # refused before encoding
    with pytest.raises(InputError, match="expected uint8"):
        pipe.reference_condition(request, image=np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="extension"):
        pipe.run(request, extend=1)
    bare = torch_pipeline(v2_bundle, reference)  # no VAE encoder backend
    with pytest.raises(BundleError, match="no VAE encoder") as e:
        bare.reference_condition(request, image=picture(8, 8))
    assert "--with-vae-encoder" in e.value.hint
    assert isinstance(pipe, PipelineV2)
