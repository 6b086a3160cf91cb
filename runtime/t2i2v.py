"""t2i2v's image step on a v2.0 bundle's optional components, torch-free: the first frame Open-Sora v2.0's
recommended flow makes with Flux.1-dev before animating it (runtime/sampler_flux.py has the maths).

    png = first_frame(pipe, request)                    # uint8 [H, W, 3] at the 768px training bucket
    reference = fit_to_video(png, request.height, request.width)   # what i2v_head then encodes

Components (osx.families.opensora_v2_0.t2i_component_specs): `t2i_denoiser` (Flux.1-dev: img, txt, timestep,
y_vec, guidance, rope_cos, rope_sin -> v) and `t2i_decoder` (Flux's AE decoder: z -> image). The text goes
through the bundle's own T5 and CLIP, the raw prompt alone (no suffixes, no negative). Progress: "t2i" per
sampling step, "t2i_decode" once (osx.runtime.progress).
"""

from __future__ import annotations

import time

import numpy as np

from osx.errors import BundleError
from osx.models_v2 import T2I_CONFIGS, rope_tables, t2i_image_size
from osx.runtime import sampler_flux
from osx.runtime.progress import Progress
from osx.runtime.scheduler import initial_noise

T2I_COMPONENTS = ("t2i_denoiser", "t2i_decoder")
F32 = np.float32


def has_t2i(pipe) -> bool:
    return all(c in pipe.backends for c in T2I_COMPONENTS)


def check_t2i(pipe) -> None:
    missing = [c for c in T2I_COMPONENTS if c not in pipe.backends]
    if missing:
        raise BundleError(f"{pipe.bundle.root} has no {' and no '.join(missing)} (Flux.1-dev and its AE decoder), which "
                          "text-to-image-to-video needs",
                          hint="export the bundle with `osx export ... --with-t2i` (Flux's flux1-dev.safetensors and "
                          "flux1-dev-ae.safetensors beside the checkpoint), or generate text-to-video without --t2i2v")


def t2i_phases(pipe, steps: int | None = None) -> list[tuple[str, int]]:
    """The progress phases `first_frame` reports (osx.runtime.progress)."""
    return [("t2i", T2I_CONFIGS[pipe.model.name].num_steps if steps is None else steps), ("t2i_decode", 1)]


def first_frame(pipe, request, progress: Progress | None = None, steps: int | None = None) -> np.ndarray:
    """The image of `request` (a PipelineV2 RequestV2) as Open-Sora saves it: uint8 [H, W, 3]. `steps`: the
    image's sampling steps (default the model's, 50)."""
    check_t2i(pipe)
    t2i = T2I_CONFIGS[pipe.model.name]
    steps = t2i.num_steps if steps is None else steps
    height, width = t2i_image_size(t2i, request.aspect_ratio)
    txt, y_vec = encode_raw_prompt(pipe, request.prompt)
    noise = initial_noise(request.seed, sampler_flux.image_latent_shape(t2i, height, width))  # the video's seed, as Open-Sora
    _, _, _, h, w = noise.shape
    p = t2i.mmdit.patch_size
    rope_cos, rope_sin = rope_tables(t2i.mmdit, 1, h // p, w // p)
    flux, spec = pipe._loaded("t2i_denoiser"), pipe.bundle.spec("t2i_denoiser")
    names, out_name = [t.name for t in spec.inputs], spec.outputs[0].name
    t_start = time.perf_counter()

    def model(img, txt_rows, t, y, g):
        feed = {"img": img, "txt": txt_rows, "timestep": t, "y_vec": y, "guidance": g, "rope_cos": rope_cos, "rope_sin": rope_sin}
        return np.asarray(flux.run({k: feed[k] for k in names})[out_name], dtype=F32)

    def on_step(i: int, x: np.ndarray) -> None:
        done = time.perf_counter() - t_start
        pipe._report(progress, "t2i", i + 1, steps, done / (i + 1) * (steps - i - 1))

    latent = sampler_flux.denoise_distilled(model, noise, txt, y_vec, t2i, num_steps=steps, on_step=on_step)
    pipe._done_with("t2i_denoiser")
    pipe.timings["t2i_s"] = time.perf_counter() - t_start
    decoder, spec = pipe._loaded("t2i_decoder"), pipe.bundle.spec("t2i_decoder")
    image = np.asarray(decoder.run({spec.inputs[0].name: np.ascontiguousarray(latent[:, :, 0])})[spec.outputs[0].name], dtype=F32)
    pipe._done_with("t2i_decoder")
    pipe._report(progress, "t2i_decode", 1, 1, 0.0)
    return sampler_flux.to_png_pixels(image[0])


def encode_raw_prompt(pipe, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """T5 states [1, L, D] and CLIP pooled [1, V] of the prompt as given (Open-Sora's image step adds nothing)."""
    out = []
    for name, tokenizer in pipe.tokenizers.items():
        ids, _ = tokenizer.encode([prompt])
        out.append(np.asarray(pipe._loaded(name).run({"input_ids": ids})[pipe.specs[name].outputs[0].name], dtype=F32))
        pipe._done_with(name)
    return out[0], out[1]
