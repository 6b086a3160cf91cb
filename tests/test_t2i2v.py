"""t2i2v's image step in the runtime (runtime/t2i2v.py) over a v2.0 bundle whose backends are the torch
reference's modules (tests/test_runtime_pipeline_v2.py's stand-ins for exported graphs), against the torch
reference of the step (export/sampler_flux.py `reference_t2i`).

Tolerance: none. Token ids, every latent and the PNG are compared for equality (both sides round the same
float32 operations to bf16 and call the same modules at batch 1; Flux gets torch's RoPE tables after the
runtime's NumPy ones are checked within 1e-6 of them, as the video denoiser's test does)."""

import dataclasses

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.errors import BundleError
from osx.families import component_specs
from osx.families.opensora_v2_0 import t2i_component_specs
from osx.manifest import ComponentEntry
from osx.models_v2 import OPENSORA_V2_0_TINY as TINY, T2I_CONFIGS, t2i_image_size
from osx.runtime import t2i2v
from osx.runtime.pipeline_v2 import PipelineV2
from osx.runtime.sampler_v2 import pack

torch = pytest.importorskip("torch")
from osx.export.flux_ae import FluxAEDecoder  # noqa: E402 (needs torch)
from osx.export.init import seeded_init_  # noqa: E402
from osx.export.mmdit import MMDiT, video_rope  # noqa: E402
from osx.export.sampler_flux import reference_t2i  # noqa: E402
from test_runtime_pipeline_v2 import MMDiTOnImageTables, TorchBackend, reference, row_by_row, v2_bundle  # noqa: E402,F401 (fixtures)

T2I = T2I_CONFIGS[TINY.name]
PROMPT = "a red fox in the snow"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FluxOnImageTables:
    """Flux taking the image tokens' tables as its graph does; torch's tables used once NumPy's match them."""

    def __init__(self, flux, L):
        self.flux, self.L, self.grid = flux, L, None  # grid: the image's (rows, cols) of 2x2 patches, set per run

    def __call__(self, img, txt, t, y, g, cos, sin):
        want_cos, want_sin = video_rope(self.flux.cfg, self.L, 1, *self.grid)
        assert torch.allclose(cos, want_cos[0, self.L:], rtol=0, atol=1e-6)
        assert torch.allclose(sin, want_sin[0, self.L:], rtol=0, atol=1e-6)
        return self.flux(img, txt, t, y, None, want_cos, want_sin, guidance=g)


@pytest.fixture(scope="module")
def flux_modules():
    return seeded_init_(MMDiT(T2I.mmdit), seed=3).eval(), seeded_init_(FluxAEDecoder(T2I.ae), seed=4).eval()


def pipeline(bundle, reference, modules=None):
    """PipelineV2 over the reference's torch modules; with `modules` (Flux, its decoder) also the t2i ones."""
    specs, L = component_specs(TINY), TINY.t5.max_length
    fns = {"text_encoder": lambda ids: reference.t5(ids, torch.ones_like(ids)), "clip": reference.clip,
           "denoiser": MMDiTOnImageTables(reference.mmdit, L), "vae_decoder": reference.vae.decode_tile}
    if modules:
        specs = {**specs, **t2i_component_specs(TINY)}
        fns.update(t2i_denoiser=FluxOnImageTables(modules[0], L), t2i_decoder=modules[1])
        entries = {n: ComponentEntry(file=f"{n}.onnx", precision="fp32", io=specs[n]) for n in t2i2v.T2I_COMPONENTS}
        bundle = Bundle(bundle.root, dataclasses.replace(bundle.manifest, components={**bundle.manifest.components, **entries}))
    return PipelineV2(bundle, {n: TorchBackend(n, specs[n], fn) for n, fn in fns.items()})


@pytest.mark.parametrize("aspect_ratio", ["1:1", "16:9"])
def test_first_frame_equals_the_reference_image_step(v2_bundle, reference, flux_modules, aspect_ratio):
    pipe = pipeline(v2_bundle, reference, flux_modules)
    request = pipe.prepare_request(PROMPT, aspect_ratio=aspect_ratio, seed=5)
    height, width = t2i_image_size(T2I, aspect_ratio)
    pipe.backends["t2i_denoiser"].fn.grid = (height // 16, width // 16)
    events = []
    png = t2i2v.first_frame(pipe, request, progress=events.append, steps=3)
    want = reference_t2i(reference, *flux_modules, T2I, PROMPT, aspect_ratio=request.aspect_ratio,
                         video_height=request.height, video_width=request.width, seed=5, num_steps=3)
    # the raw prompt, no suffixes: the same ids as the reference's
    t5_ids = pipe.backends["text_encoder"].calls[-1]["input_ids"]
    assert np.array_equal(t5_ids, want.t5_ids) and np.array_equal(pipe.backends["clip"].calls[-1]["input_ids"], want.clip_ids)
    # every step's input (the latent after the previous step), guidance 4.0, then the image as saved
    calls = pipe.backends["t2i_denoiser"].calls
    assert len(calls) == 3 and all(np.all(c["guidance"] == 4.0) for c in calls)
    assert np.array_equal(calls[0]["img"], pack(want.noise))
    for i, c in enumerate(calls[1:]):
        assert np.array_equal(c["img"], pack(want.latents[i])), f"step {i + 1}"
    decoded = pipe.backends["t2i_decoder"].calls[-1]["z"]
    assert np.array_equal(decoded, want.latent[:, :, 0])
    assert png.shape == (want.height, want.width, 3) and np.array_equal(png, want.png)
    assert [(e["phase"], e["step"]) for e in events] == [("t2i", 1), ("t2i", 2), ("t2i", 3), ("t2i_decode", 1)]
    assert t2i2v.t2i_phases(pipe, 3) == [("t2i", 3), ("t2i_decode", 1)]
    # then the crop/resize i2v_head reads it with, to the video's size
    ref = t2i2v.sampler_flux.fit_to_video(png, request.height, request.width)
    assert ref.shape == want.reference.shape and np.max(np.abs(ref - want.reference)) <= 1 / 127.5 + 1e-6


def test_a_bundle_without_the_t2i_components_says_how_to_add_them(v2_bundle, reference):
    pipe = pipeline(v2_bundle, reference)
    assert not t2i2v.has_t2i(pipe)
    with pytest.raises(BundleError, match="no t2i_denoiser and no t2i_decoder") as e:
        t2i2v.first_frame(pipe, pipe.prepare_request(PROMPT))
    assert "--with-t2i" in e.value.hint and "flux1-dev.safetensors" in e.value.hint


def test_whole_flow_over_the_torch_modules_in_bf16(v2_bundle, reference, row_by_row, flux_modules):
    """The runtime's whole t2i2v flow (PipelineV2.run) at Open-Sora's bf16, over the reference's torch modules,
    against reference_t2i2v. Tolerance: the image and its PNG are equal (same roundings, same modules); the video
    reads that PNG through the runtime's NumPy resize (within 1 uint8 level of PIL's, runtime/conditioning.py)
    and the VAE encoder per tile, as tests/test_image_to_video_v2.py's i2v runs: 1e-4 relative on the latent,
    frames within 1 level."""
    from osx.export.adapters_v2 import encode_mean
    from osx.export.sampler_flux import reference_t2i2v

    pipe = pipeline(v2_bundle, reference, flux_modules)
    spec = v2_bundle.manifest.components["vae_encoder"].io
    pipe.backends["vae_encoder"] = TorchBackend("vae_encoder", spec, lambda video: encode_mean(reference.vae, video))
    request = pipe.prepare_request(PROMPT, aspect_ratio="16:9", seed=5, steps=3, t2i_steps=2)
    assert request.t2i2v is None and t2i2v.wanted(pipe, request)  # on by default: the bundle has the components
    height, width = t2i_image_size(T2I, "16:9")
    pipe.backends["t2i_denoiser"].fn.grid = (height // 16, width // 16)
    _, _, T, h, w = pipe.latent_shape(request)
    pipe.backends["denoiser"].fn.grid = (T, h // 2, w // 2)
    latents, decode = [], pipe.decode
    pipe.decode = lambda latent, *a: latents.append(latent.copy()) or decode(latent, *a)
    frames = pipe.run(request)
    # the reference calls its MMDiT one row at a time, as the backend does (bf16 results depend on the batch)
    image, want = reference_t2i2v(row_by_row, *flux_modules, T2I, PROMPT, aspect_ratio="16:9", seed=5, num_steps=3, t2i_steps=2)
    assert np.array_equal(pipe.t2i_image, image.png)
    err = float(np.linalg.norm(latents[0] - want.latent) / np.linalg.norm(want.latent))
    assert err < 1e-4, f"latent {err:.2e} relative"  # measured 0: bit-equal (the resize matched PIL here)
    assert np.max(np.abs(frames.astype(int) - want.frames)) <= 1  # measured 0 levels
