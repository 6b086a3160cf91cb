"""The torch reference pipeline on the tiny model: one call from prompt to uint8 frames, every
intermediate retrievable, deterministic for given noise, guidance really mixing cond and uncond."""

import io

import numpy as np
import pytest
import torch

from osx.errors import CheckpointError, InputError, OsxError
from osx.export.checkpoint import save_safetensors
from osx.export.pipeline import reference_generate
from osx.export.reference import build_reference
from osx.export.sampler import timesteps
from osx.models import OPENSORA_V1_2_TINY as TINY
from osx.runtime.scheduler import initial_noise

PROMPT = "a dog running on the beach at sunset"
# Runs that only check the wiring: 2 steps, one VAE chunk, 32x32 pixels.
FAST = dict(steps=2, num_frames=17, height=32, width=32)


@pytest.fixture(scope="module")
def model():
    return build_reference(TINY, seed=0)


@pytest.fixture(scope="module")
def result(model):
    return reference_generate(model, PROMPT)  # the tiny defaults: 64x64, 34 frames (2 VAE chunks)


@pytest.fixture(scope="module")
def fast(model):
    return reference_generate(model, PROMPT, seed=5, **FAST)  # guidance 7.0, the default


def test_defaults_give_frames_of_the_expected_count_and_size(result):
    d = TINY.defaults
    assert (d.num_frames, d.height, d.width) == (34, 64, 64)
    assert result.frames.dtype == np.uint8
    assert result.frames.shape == (34, 64, 64, 3)
    assert result.video.shape == (1, 3, 34, 64, 64)
    assert result.latent.shape == result.noise.shape == (1, 4, 10, 8, 8)
    assert result.frames.std() > 1  # not a flat grey video


def test_frames_are_open_soras_mapping_of_the_video(result):
    # Open-Sora's save_sample, in torch float32 as there
    x = torch.from_numpy(result.video[0]).clamp(-1, 1)
    x = x.sub(-1).div(2).mul(255).add(0.5).clamp(0, 255).permute(1, 2, 3, 0).to(torch.uint8)
    np.testing.assert_array_equal(result.frames, x.numpy())


def test_intermediates(model, result):
    assert result.prompt == "a dog running on the beach at sunset aesthetic score: 6.5."
    n = int(result.attention_mask.sum())
    assert result.input_ids[0, n - 1] == 1 and not result.input_ids[0, n:].any()  # </s>, then padding
    ids, mask = torch.from_numpy(result.input_ids), torch.from_numpy(result.attention_mask)
    with torch.no_grad():
        np.testing.assert_array_equal(result.text_embeds, model.text_encoder(ids, mask).numpy())
    np.testing.assert_array_equal(result.y_null[0], model.denoiser.y_embedder.y_embedding.numpy())
    np.testing.assert_array_equal(result.noise, initial_noise(TINY.defaults.seed, result.noise.shape))
    assert len(result.latents) == len(result.timesteps) == TINY.scheduler.num_sampling_steps
    np.testing.assert_array_equal(result.latents[-1], result.latent)
    with torch.no_grad():
        np.testing.assert_array_equal(result.video, model.vae.decode(torch.from_numpy(result.latent), 34).numpy())


@torch.no_grad()
def test_first_step_is_the_guided_euler_step(model, result):
    # Recompute step 0 from the denoiser alone: z1 = z0 + dt0 * (v_u + g (v_c - v_u)), with the cond
    # prompt's mask on the uncond row too.
    ts = timesteps(TINY.scheduler, len(result.timesteps), 64, 64, 34)
    z0 = torch.from_numpy(result.noise)
    mask = torch.from_numpy(result.attention_mask)
    sizes = [torch.tensor([v], dtype=torch.float32) for v in (24.0, 64.0, 64.0)]
    v = lambda y: model.denoiser(z0, ts[:1], torch.from_numpy(y), mask, *sizes)[:, :4]
    v_c, v_u = v(result.text_embeds), v(result.y_null)
    z1 = z0 + (ts[0] - ts[1]) / 1000 * (v_u + 7.0 * (v_c - v_u))
    # tolerance: batch-of-2 vs batch-of-1 float32 summation order
    np.testing.assert_allclose(result.latents[0], z1.numpy(), rtol=1e-4, atol=1e-5)


def test_deterministic_for_given_noise(model, fast):
    np.testing.assert_array_equal(fast.noise, initial_noise(5, (1, 4, 5, 4, 4)))
    again = reference_generate(model, PROMPT, noise=fast.noise, **FAST)
    np.testing.assert_array_equal(again.latent, fast.latent)
    np.testing.assert_array_equal(again.frames, fast.frames)
    assert again.frames.shape == (17, 32, 32, 3)


def test_guidance_mixes_cond_and_uncond(model, fast):
    assert fast.guidance_scale == 7.0
    g1 = reference_generate(model, PROMPT, seed=5, guidance_scale=1.0, **FAST)
    assert np.abs(g1.latent - fast.latent).max() > 1e-2
    assert (g1.frames != fast.frames).any()


@torch.no_grad()
def test_negative_prompt_replaces_the_null_caption(model, fast):
    r = reference_generate(model, PROMPT, negative_prompt="Blurry, LOW quality", seed=5, **FAST)
    assert r.negative_prompt == "blurry, low quality"  # cleaned, no aesthetic suffix
    # Its own T5 embedding (own tokens, own T5 attention mask), padded by hand to L tokens here:
    tokens = model.tokenizer.encode(r.negative_prompt).ids
    L = TINY.text_encoder.max_length
    ids = torch.tensor([tokens + [0] * (L - len(tokens))])
    mask = torch.tensor([[1] * len(tokens) + [0] * (L - len(tokens))])
    np.testing.assert_array_equal(r.y_null, model.text_encoder(ids, mask).numpy())
    # ... while the denoiser's key mask stays the prompt's, for both halves (as Open-Sora repeats it)
    np.testing.assert_array_equal(r.attention_mask, fast.attention_mask)
    assert np.abs(r.latent - fast.latent).max() > 1e-2


def test_bad_requests(model):
    with pytest.raises(InputError, match="noise"):
        reference_generate(model, PROMPT, noise=np.zeros((1, 4, 5, 8, 8), np.float32))
    with pytest.raises(InputError, match="num_frames"):
        reference_generate(model, PROMPT, num_frames=0)
    with pytest.raises(InputError, match="pixels"):
        reference_generate(model, PROMPT, height=8)


# --- building from checkpoint files ----------------------------------------------------------------


def _sentencepiece_model(path):
    import sentencepiece as spm

    words = PROMPT.split() + "and the sea with waves in a red sky".split()
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 10
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, vocab_size=32, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    path.write_bytes(buf.getvalue())


def test_build_from_checkpoint_files(model, tmp_path):
    files = {"denoiser": tmp_path / "stdit3.safetensors", "vae": tmp_path / "vae.safetensors", "t5": tmp_path / "t5"}
    save_safetensors(model.denoiser.state_dict(), files["denoiser"])
    save_safetensors(model.vae.state_dict(), files["vae"])
    save_safetensors(model.text_encoder.state_dict(), files["t5"] / "model.safetensors")
    _sentencepiece_model(files["t5"] / "spiece.model")

    loaded = build_reference(TINY, checkpoint=files)
    for part in ("denoiser", "vae", "text_encoder"):
        want, got = getattr(model, part).state_dict(), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part
        assert not getattr(loaded, part).training
    assert loaded.tokenizer.encode("a dog").ids[-1] == 1  # the converted T5 tokenizer appends </s>

    with pytest.raises(CheckpointError, match="vae"):
        build_reference(TINY, checkpoint={k: v for k, v in files.items() if k != "vae"})
    with pytest.raises(OsxError, match="not both"):
        build_reference(TINY, seed=1, checkpoint=files)
