"""t2i2v's image step: the NumPy distilled sampler (runtime/sampler_flux.py) against the torch reference
(export/sampler_flux.py) over the tiny Flux (float32 and bf16 weights), the schedule and the training
buckets against arithmetic written here, the saved PNG against torch's bf16 arithmetic, and the resize to
the video size against PIL.

Tolerances: the loop is compared for equality at every step (both sides do the same bf16 roundings of the
same float32 operations, as runtime/sampler_v2.py's test); the PNG for equality; the NumPy resize is within
one uint8 level of PIL's (runtime/conditioning.py's documented accuracy)."""


import numpy as np
import pytest
import torch

from osx.errors import InputError
from osx.export import sampler_flux as reference
from osx.export.flux_ae import FluxAEDecoder
from osx.export.init import seeded_init_
from osx.export.mmdit import MMDiT, video_rope
from osx.export.pipeline import reference_preprocess
from osx.export.pipeline_v2 import build_reference_v2
from osx.models_v2 import OPENSORA_V2_0_TINY, T2I_CONFIGS, aspect_buckets, image_size, OPENSORA_V2_0, t2i_image_size
from osx.runtime import sampler_flux
from osx.runtime.scheduler import initial_noise

T2I = T2I_CONFIGS[OPENSORA_V2_0_TINY.name]
L = 8
BF16 = torch.bfloat16

pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module", params=[torch.float32, BF16], ids=["fp32", "bf16"])
def flux(request):
    return seeded_init_(MMDiT(T2I.mmdit), seed=3).to(request.param).eval()

class AsNumPy:
    """The torch Flux as the runtime's NumPy callback (interleaved RoPE tables of the image)."""

    def __init__(self, flux, h, w, text_tokens=L):
        self.flux, self.calls = flux, 0
        self.cos, self.sin = video_rope(flux.cfg, text_tokens, 1, h // 2, w // 2)

    def __call__(self, img, txt, t, y, g):
        self.calls += 1
        with torch.no_grad():
            img, txt, t, y, g = (torch.from_numpy(np.ascontiguousarray(a)) for a in (img, txt, t, y, g))
            return self.flux(img, txt, t, y, None, self.cos, self.sin, guidance=g).float().numpy()

def text(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, L, T2I.mmdit.context_in_dim, generator=g), torch.randn(batch, T2I.mmdit.vec_in_dim, generator=g)

@pytest.mark.parametrize("batch", [1, 2])
def test_numpy_loop_equals_torch_reference_every_step(flux, batch):
    shape = (batch, 16, 1, 6, 4)
    noise = initial_noise(7, shape)
    txt, y = text(batch=batch)
    _, want = reference.denoise_distilled(flux, torch.from_numpy(noise).to(BF16), txt, y, T2I, return_intermediates=True)
    model, got = AsNumPy(flux, 6, 4), []
    last = sampler_flux.denoise_distilled(model, noise, txt.numpy(), y.numpy(), T2I, on_step=lambda i, x: got.append(x.copy()))
    assert model.calls == T2I.num_steps == len(got)  # one pass per step, no CFG rows
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w.float().numpy()), f"step {i}"
    assert np.array_equal(last, got[-1])

def test_guidance_input_changes_the_image(flux):
    noise, (txt, y) = initial_noise(1, (1, 16, 1, 4, 4)), text()
    run = lambda g: sampler_flux.denoise_distilled(AsNumPy(flux, 4, 4), noise, txt.numpy(), y.numpy(), T2I, num_steps=2, guidance=g)  # noqa: E731
    assert not np.array_equal(run(4.0), run(1.0))

def test_one_latent_frame_and_one_text_row_per_prompt(flux):
    txt, y = text()
    with pytest.raises(InputError, match="one latent frame"):
        sampler_flux.denoise_distilled(AsNumPy(flux, 4, 4), np.zeros((1, 16, 2, 4, 4), np.float32), txt.numpy(), y.numpy(), T2I)
    with pytest.raises(InputError, match="one row per prompt"):
        sampler_flux.denoise_distilled(AsNumPy(flux, 4, 4), np.zeros((2, 16, 1, 4, 4), np.float32), txt.numpy(), y.numpy(), T2I)

def test_schedule_shift_from_the_image_token_count():
    real = T2I_CONFIGS[OPENSORA_V2_0.name]
    h, w = t2i_image_size(real, "1:1")
    shape = sampler_flux.image_latent_shape(real, h, w)
    assert (h, w, shape) == (768, 768, (1, 16, 1, 96, 96))
    tokens = 96 * 96 // 4
    alpha = 1 + 2 / 3840 * (tokens - 256)  # linear through (256, 1) and (4096, 3), times sqrt(1 frame)
    assert abs(alpha - 2.0667) < 1e-4  # the design doc's figure
    t = np.linspace(1, 0, 51)
    want = alpha * t / (1 + (alpha - 1) * t)
    got = sampler_flux.t2i_schedule(real, 50, 96, 96)
    assert len(got) == 51 and got[0] == 1 and got[-1] == 0
    assert np.max(np.abs(np.array(got) - want)) < 1e-6  # float32 vs float64

def test_training_buckets():
    # Open-Sora's inference buckets: the same as osx's video sizes
    for ratio, hw in aspect_buckets(768, training=False).items():
        if ratio in ("16:9", "9:16", "1:1", "2.39:1", "1:2.39", "4:3", "3:4", "3:2", "2:3", "2:1", "1:2"):
            assert hw == image_size(OPENSORA_V2_0, "768px", ratio), ratio
    # training: one 16 px step on one side when the area comes closer to 768^2 = 589,824
    train = aspect_buckets(768, training=True)
    assert train["16:9"] == (576, 1024) and train["1:1"] == (768, 768)  # already exact
    assert train["4:3"] == (672, 880)  # 656x880 = 577,280 -> 672x880 = 591,360
    assert train["2:1"] == (544, 1088)  # 544x1072 = 583,168 -> 544x1088 = 591,872
    assert train["3:4"] == (880, 672)
    assert aspect_buckets(256, training=True)["2.39:1"] == (160, 400)  # the design doc's one 256px difference
    assert "1.85:1" not in aspect_buckets(256, training=True)  # equal to 16:9 there: dropped
    real = T2I_CONFIGS[OPENSORA_V2_0.name]
    assert t2i_image_size(real, "4:3") == (672, 880)
    with pytest.raises(InputError, match="no text-to-image bucket"):
        t2i_image_size(T2I, "4:3")  # the tiny 112 px buckets have no 4:3

def test_png_pixels_equal_torch_bf16_arithmetic():
    g = np.random.default_rng(0)
    image = (g.standard_normal((3, 24, 40)) * 0.8).astype(np.float32)
    image[0, 0, :4] = [-1.5, 1.5, -1.0, 1.0]
    want = reference.png_pixels(torch.from_numpy(image).to(BF16))  # the decoder output of a bf16 run
    got = sampler_flux.to_png_pixels(image)
    assert got.dtype == np.uint8 and got.shape == (24, 40, 3)
    assert np.array_equal(got, want)
    assert got[0, 0, 0] == 0 and got[0, 1, 0] == 255

@pytest.mark.parametrize("size", [(112, 112), (80, 160), (40, 40)])
def test_fit_to_video_is_pils_resize_crop(size):
    png = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    got = sampler_flux.fit_to_video(png, 64, 96)
    want = reference_preprocess(png, 64, 96).numpy()[:, None]
    assert got.shape == want.shape == (3, 1, 64, 96)
    assert np.max(np.abs(got - want)) <= 1 / 127.5 + 1e-6

def test_whole_image_step_equals_reference():
    ref = build_reference_v2(OPENSORA_V2_0_TINY, dtype=BF16)
    flux = seeded_init_(MMDiT(T2I.mmdit), seed=3).to(BF16).eval()
    ae = seeded_init_(FluxAEDecoder(T2I.ae), seed=4).to(BF16).eval()
    want = reference.reference_t2i(ref, flux, ae, T2I, "a red fox. ", aspect_ratio="16:9", video_height=64, video_width=64, num_steps=3)
    assert (want.height, want.width) == (80, 160) and want.noise.shape == (1, 16, 1, 10, 20)
    assert abs(want.timesteps[0] - 1) < 1e-6 and len(want.latents) == 3  # float32 shift: 1 + 1 ulp here

    model = AsNumPy(flux, 10, 20, text_tokens=want.txt.shape[1])
    latent = sampler_flux.denoise_distilled(model, want.noise, want.txt, want.y_vec, T2I, num_steps=3)
    assert np.array_equal(latent, want.latent)
    with torch.no_grad():
        image = ae(torch.from_numpy(latent[:, :, 0])).float().numpy()[0]
    png = sampler_flux.to_png_pixels(image)
    assert np.array_equal(png, want.png)
    assert np.max(np.abs(sampler_flux.fit_to_video(png, 64, 64) - want.reference)) <= 1 / 127.5 + 1e-6


def test_fp32_reference_dtype_loop_and_png_equal_torch_in_float32():
    """Reference dtype fp32 (osx export --reference-dtype fp32): no bf16 anywhere, on both sides."""
    flux32 = seeded_init_(MMDiT(T2I.mmdit, "fp32"), seed=3).eval()
    noise, (txt, y) = initial_noise(7, (1, 16, 1, 6, 4)), text()
    _, want = reference.denoise_distilled(flux32, torch.from_numpy(noise), txt, y, T2I, return_intermediates=True)
    got = []
    sampler_flux.denoise_distilled(AsNumPy(flux32, 6, 4), noise, txt.numpy(), y.numpy(), T2I, reference_dtype="fp32",
                                   on_step=lambda i, x: got.append(x.copy()))
    assert all(w.dtype == torch.float32 for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w.numpy()), f"step {i}"
    bf16 = sampler_flux.denoise_distilled(AsNumPy(flux32, 6, 4), noise, txt.numpy(), y.numpy(), T2I)
    assert not np.array_equal(bf16, got[-1])  # the setting matters
    image = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.7
    assert np.array_equal(sampler_flux.to_png_pixels(image.numpy(), "fp32"), reference.png_pixels(image))
