"""The v2.0 torch reference pipeline on the tiny model: t2v and i2v end to end, prompt handling, the text
rows, conditioning wiring and the reference write-back, noise from the seed, refusals."""

import numpy as np
import pytest
import torch

from osx.errors import InputError
from osx.export.pipeline_v2 import build_reference_v2, reference_generate_v2, resize_crop
from osx.models_v2 import OPENSORA_V2_0_TINY as TINY
from osx.models_v2 import prepare_prompt_v2
from osx.runtime.scheduler import initial_noise

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::osx.runtime.tokenizer.PromptTruncatedWarning")]


@pytest.fixture(scope="module")
def model():
    return build_reference_v2(TINY)


def image(seed=0, h=80, w=100):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def test_prompt_suffixes():
    assert prepare_prompt_v2("raining, sea") == "raining, sea. 24 FPS. 4 motion score."
    assert prepare_prompt_v2("  a cat.  ", fps=16, motion_score="7") == "a cat. 16 FPS. 7 motion score."
    assert prepare_prompt_v2("a cat. 30 FPS.") == "a cat. 30 FPS. 4 motion score."  # fps kept when given
    assert prepare_prompt_v2("") == ". 24 FPS. 4 motion score."  # as Open-Sora's code does
    with pytest.raises(InputError, match="dynamic"):
        prepare_prompt_v2("x", motion_score="dynamic")


def test_t2v_end_to_end(model):
    r = reference_generate_v2(model, "a red car", negative_prompt="blurry", seed=7)
    assert (r.height, r.width, r.num_frames) == (64, 64, 9)
    assert r.frames.shape == (9, 64, 64, 3) and r.frames.dtype == np.uint8 and r.frames.std() > 1
    assert r.video.shape == (1, 3, 9, 64, 64) and len(r.latents) == TINY.sampler.num_steps
    assert r.prompt == "a red car. 24 FPS. 4 motion score." and r.negative_prompt == "blurry"
    # text rows [prompt, negative, negative]; the negative prompt is not suffixed
    assert np.array_equal(r.t5_ids[1], r.t5_ids[2]) and not np.array_equal(r.t5_ids[0], r.t5_ids[1])
    assert np.array_equal(r.y_vec[1], r.y_vec[2])
    # t2v: nothing conditioned
    assert r.masks.sum() == 0 and r.masked_ref.sum() == 0
    # noise: osx's seeded noise, in bf16
    want = torch.from_numpy(initial_noise(7, (1, 16, 3, 8, 8))).to(torch.bfloat16).float().numpy()
    assert np.array_equal(r.noise, want)
    again = reference_generate_v2(model, "a red car", negative_prompt="blurry", seed=7)
    other = reference_generate_v2(model, "a red car", negative_prompt="blurry", seed=8)
    assert np.array_equal(r.frames, again.frames) and not np.array_equal(r.frames, other.frames)


def test_t5_sees_the_pads(model):
    """Open-Sora passes no attention mask to T5: the pads are attended, so the states differ from masked T5."""
    r = reference_generate_v2(model, "a dog", num_steps=1)
    ids = torch.from_numpy(r.t5_ids)
    with torch.no_grad():
        unmasked = model.t5(ids, torch.ones_like(ids)).float().numpy()
        masked = model.t5(ids, (ids != 0).long()).float().numpy()
    assert np.array_equal(r.txt, unmasked) and not np.allclose(r.txt[:, :3], masked[:, :3])


def test_empty_negative_prompt_is_encoded(model):
    r = reference_generate_v2(model, "a dog", num_steps=1)
    assert r.negative_prompt == "" and r.t5_ids[1, 0] == TINY.t5.eos_token_id and (r.t5_ids[1, 1:] == 0).all()
    assert r.clip_ids[1, :2].tolist() == [TINY.clip.bos_token_id, TINY.clip.eos_token_id]
    assert np.abs(r.txt[1]).sum() > 0  # encoded by T5 like any prompt, no learned null embedding


@pytest.mark.parametrize("cond_type,frames", [("i2v_head", [0]), ("i2v_tail", [-1]), ("i2v_loop", [0, -1])])
def test_i2v_conditions_and_writes_back_the_reference(model, cond_type, frames):
    refs = [image(1), image(2)] if cond_type == "i2v_loop" else [image(1)]
    r = reference_generate_v2(model, "a red car", cond_type=cond_type, references=refs)
    T = r.masks.shape[2]
    marked = sorted(f % T for f in frames)
    assert [k for k in range(T) if r.masks[0, 0, k].all()] == marked
    assert all(not r.masks[0, 0, k].any() for k in range(T) if k not in marked)
    with torch.no_grad():  # the posterior mean of the reference frame(s), as conditioning and written back
        encoded = {0: model.vae.encode(resize_crop(refs[0], 64, 64)[None, :, :1].to(torch.bfloat16)),
                   -1: model.vae.encode(resize_crop(refs[-1], 64, 64)[None, :, -1:].to(torch.bfloat16))}
    for f in frames:
        ref = encoded[f].float().numpy()[0, :, 0]
        assert np.array_equal(r.masked_ref[0, :, f], ref)
        assert np.array_equal(r.latent[0, :, f], ref)
        assert not np.array_equal(r.latents[-1][0, :, f], ref)  # the sampler itself left the frame free
    t2v = reference_generate_v2(model, "a red car")
    assert not np.array_equal(r.latents[-1], t2v.latents[-1])


def test_v2v_head_conditions_nine_latent_frames(model):
    video = np.stack([image(i, 64, 64) for i in range(33)])
    r = reference_generate_v2(model, "a red car", cond_type="v2v_head", references=[video], num_frames=33, num_steps=2)
    assert r.masks.shape[2] == 9 and r.masks[0, 0].all()
    with pytest.raises(InputError, match="at least 33 frames"):
        reference_generate_v2(model, "x", cond_type="v2v_tail", references=[video[:20]], num_frames=33, num_steps=1)


def test_resize_crop_covers_and_centres():
    img = np.zeros((40, 120, 3), np.uint8)
    img[:, 40:80] = 255  # a white centre band
    out = resize_crop(img, 32, 32)  # scaled to 32 x 96, the centre 32 columns kept
    assert out.shape == (3, 1, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert out[:, :, :, 4:28].mean() > 0.95
    same = image(3, 32, 32)
    assert torch.allclose(resize_crop(same, 32, 32), torch.from_numpy(same).permute(2, 0, 1)[:, None].float() / 127.5 - 1)


def test_resize_crop_offsets_follow_open_sora():
    """An excess of 3 pixels (35 columns at the target height, so nothing is resized): Open-Sora crops an image
    at int(round(3 / 2.0)) = 2 (`resize_crop_to_fill`, Python rounds 1.5 to 2), a video at int(round(3) / 2.0) = 1
    (`video_transforms.resize_crop_to_fill`). Exact: no resampling happens, only the crop and the scaling."""
    img = image(5, 32, 35)
    unit = lambda a: torch.from_numpy(a).permute(2, 0, 1)[:, None].float() / 127.5 - 1  # noqa: E731
    assert torch.allclose(resize_crop(img, 32, 32), unit(img[:, 2:34]), atol=1e-6)
    video = resize_crop(np.stack([img, img]), 32, 32)
    assert torch.allclose(video, torch.cat([unit(img[:, 1:33])] * 2, dim=1), atol=1e-6)
    tall = image(6, 39, 32)  # the same for rows: 7 rows of excess -> round(3.5) = 4 (image), 3 (video)
    assert torch.allclose(resize_crop(tall, 32, 32), unit(tall[4:36]), atol=1e-6)
    assert torch.allclose(resize_crop(tall[None], 32, 32), unit(tall[3:35]), atol=1e-6)


def test_refusals(model):
    with pytest.raises(InputError, match="4k\\+1"):
        reference_generate_v2(model, "x", num_frames=8)
    with pytest.raises(InputError, match="needs a reference"):
        reference_generate_v2(model, "x", cond_type="i2v_head")
    with pytest.raises(InputError, match="takes no reference"):
        reference_generate_v2(model, "x", references=[image()])
    with pytest.raises(InputError, match="unknown cond_type"):
        reference_generate_v2(model, "x", cond_type="v2v_head_half")
    with pytest.raises(InputError, match="at least 16 pixels"):
        reference_generate_v2(model, "x", height=8, width=64)
    with pytest.raises(InputError, match="noise has shape"):
        reference_generate_v2(model, "x", noise=np.zeros((1, 16, 3, 4, 4), np.float32))


def test_float32_build_follows_bf16(model):
    r16 = reference_generate_v2(model, "a red car", num_steps=4)
    r32 = reference_generate_v2(build_reference_v2(TINY, dtype=torch.float32), "a red car", num_steps=4)
    err = np.abs(r32.latent - r16.latent).max() / np.abs(r16.latent).max()
    assert err < 0.1, err  # same weights; bf16 compute drifts a few bf16 steps per block and step


def test_real_model_builds_on_meta():
    """opensora-v2.0's four parts at the released sizes (shared/design/opensora-v2.0.md, table at the top)."""
    from osx.export.pipeline_v2 import build_modules
    from osx.models_v2 import OPENSORA_V2_0

    modules = build_modules(OPENSORA_V2_0, meta=("mmdit", "t5", "clip", "vae"))
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()}
    assert counts == {"mmdit": 11_891_390_528, "t5": 4_762_310_656, "clip": 123_060_480, "vae": 246_478_803}
    assert len(modules["mmdit"].state_dict()) == 1082 and len(modules["vae"].state_dict()) == 248


def test_one_frame_i2v_is_unconditioned_then_overwritten(model):
    """As Open-Sora: an image (one latent frame) gets no conditioning, but the reference is still written back."""
    r = reference_generate_v2(model, "a red car", cond_type="i2v_head", references=[image(4)], num_frames=1, num_steps=2)
    assert r.masks.sum() == 0 and r.frames.shape == (1, 64, 64, 3)
    with torch.no_grad():
        ref = model.vae.encode(resize_crop(image(4), 64, 64)[None].to(torch.bfloat16)).float().numpy()
    assert np.array_equal(r.latent, ref)
