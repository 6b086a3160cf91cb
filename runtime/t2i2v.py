"""Text -> image -> video on a v2.0 bundle with the optional t2i components, torch-free: Open-Sora v2.0's
recommended flow (its t2i2v configs) makes the first frame with Flux.1-dev, then animates it as i2v_head
(runtime/sampler_flux.py has the image step's maths).

    frames = run(pipe, request)      # PipelineV2.run with request.t2i2v (default: on where the bundle has them)
      text     the video prompt's rows (PipelineV2.encode_text) and the raw prompt's, text encoders loaded once
      t2i      png = first_frame(...): uint8 [H, W, 3] at the image resolution's training bucket
      i2v      PipelineV2.reference_condition(png, "head"): resize to fill the video size, centre crop, VAE
               encode (Open-Sora's resize_crop of the saved PNG), then the video's guided loop and decode

Components (osx.families.opensora_v2_0.t2i_component_specs): `t2i_denoiser` (Flux.1-dev: img, txt, timestep,
y_vec, guidance, rope_cos, rope_sin -> v) and `t2i_decoder` (Flux's AE decoder: z -> image). The text goes
through the bundle's own T5 and CLIP, the raw prompt alone (no suffixes, no negative). Progress: "t2i" per
sampling step, "t2i_decode" once (osx.runtime.progress).
"""

from __future__ import annotations

import time

import numpy as np

from osx.errors import BundleError, InputError
from osx.models_v2 import T2I_CONFIGS, rope_tables, t2i_image_size
from osx.runtime import sampler_flux
from osx.runtime.progress import Progress
from osx.runtime.request import as_int, check_int_range
from osx.runtime.scheduler import initial_noise
from osx.runtime.video import to_uint8_frames

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


def check_request(pipe, t2i2v, t2i_steps, aspect_ratio: str) -> tuple[bool | None, int | None]:
    """prepare_request's t2i2v options, checked before any work: `t2i2v` True / False / None (on where the
    bundle has the components and no reference is given); `t2i_steps` the image's sampling steps (None: the
    model's, 50)."""
    if t2i2v is not None and not isinstance(t2i2v, (bool, np.bool_)):
        raise InputError(f"t2i2v={t2i2v!r}: expected true, false or none (default: on where the bundle has Flux.1-dev)")
    if t2i_steps is not None:
        t2i_steps = check_int_range("t2i steps", as_int("t2i steps", t2i_steps), 1, 1000,
                                    hint=f"the image step's default is {T2I_CONFIGS[pipe.model.name].num_steps}")
        if t2i2v is False or (t2i2v is None and not has_t2i(pipe)):  # steps of an image step that will not run
            raise InputError(f"t2i steps ({t2i_steps}) set, but this run makes no first frame with Flux.1-dev "
                             f"({'t2i2v is off' if t2i2v is False else 'the bundle has no t2i components'})",
                             hint="drop the t2i steps" + ("" if t2i2v is False else ", or export the bundle with --with-t2i"))
    if t2i2v:
        check_t2i(pipe)
    if t2i2v or (t2i2v is None and has_t2i(pipe)):
        t2i_image_size(T2I_CONFIGS[pipe.model.name], aspect_ratio)  # the video's aspect ratio has an image bucket
    return None if t2i2v is None else bool(t2i2v), t2i_steps


def wanted(pipe, request, image=None, video=None) -> bool:
    """Whether this run makes its first frame with Flux.1-dev."""
    if request.t2i2v is None:
        return has_t2i(pipe) and image is None and video is None
    if request.t2i2v and (image is not None or video is not None):
        raise InputError("text-to-image-to-video makes the first frame itself; it takes no reference image or video",
                         hint="drop the reference, or turn t2i2v off (--no-t2i2v) to condition on it")
    return request.t2i2v


def steps(pipe, request, reference: bool = False) -> int | None:
    """The image step's sampling steps a request (of any family) runs, None where it makes no first frame;
    `reference`: the request has a reference image or video (an InputError with t2i2v on, as `run` gives)."""
    if getattr(request, "t2i2v", False) is False or not wanted(pipe, request, image=reference or None):
        return None
    return request.t2i_steps or T2I_CONFIGS[pipe.model.name].num_steps


def run(pipe, request, noise: np.ndarray | None = None, progress: Progress | None = None) -> np.ndarray:
    """The whole flow for a PipelineV2 `request` -> uint8 frames [F, H, W, 3]."""
    keep, pipe.load_one_at_a_time = pipe.load_one_at_a_time, False  # T5 and CLIP loaded once for both texts
    try:
        txt, y_vec = pipe.encode_text(request, progress)
        raw = encode_raw_prompt(pipe, request.prompt)
    finally:
        pipe.load_one_at_a_time = keep
    for name in pipe.tokenizers:
        pipe._done_with(name)
    png = first_frame(pipe, request, progress, request.t2i_steps, raw)
    pipe.t2i_image = png  # the first frame i2v_head was given (Open-Sora saves it as a PNG)
    condition = pipe.reference_condition(request, image=png, condition="head", progress=progress)
    latent = pipe.denoise(request, txt, y_vec, noise, progress, condition)
    return to_uint8_frames(pipe.decode(latent, request.num_frames, progress))


def t2i_phases(pipe, steps: int | None = None) -> list[tuple[str, int]]:
    """The progress phases `first_frame` reports (osx.runtime.progress)."""
    return [("t2i", T2I_CONFIGS[pipe.model.name].num_steps if steps is None else steps), ("t2i_decode", 1)]


def first_frame(pipe, request, progress: Progress | None = None, steps: int | None = None,
                text: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The image of `request` (a PipelineV2 RequestV2) as Open-Sora saves it: uint8 [H, W, 3]. `steps`: the
    image's sampling steps (default the model's, 50); `text`: encode_raw_prompt's result, if already made."""
    check_t2i(pipe)
    t2i = T2I_CONFIGS[pipe.model.name]
    steps = t2i.num_steps if steps is None else steps
    height, width = t2i_image_size(t2i, request.aspect_ratio)
    txt, y_vec = encode_raw_prompt(pipe, request.prompt) if text is None else text
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

    dtype = pipe.sampler.reference_dtype
    latent = sampler_flux.denoise_distilled(model, noise, txt, y_vec, t2i, num_steps=steps, on_step=on_step, reference_dtype=dtype)
    pipe._done_with("t2i_denoiser")
    pipe.timings["t2i_s"] = time.perf_counter() - t_start
    decoder, spec = pipe._loaded("t2i_decoder"), pipe.bundle.spec("t2i_decoder")
    image = np.asarray(decoder.run({spec.inputs[0].name: np.ascontiguousarray(latent[:, :, 0])})[spec.outputs[0].name], dtype=F32)
    pipe._done_with("t2i_decoder")
    pipe._report(progress, "t2i_decode", 1, 1, 0.0)
    return sampler_flux.to_png_pixels(image[0], dtype)


def encode_raw_prompt(pipe, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """T5 states [1, L, D] and CLIP pooled [1, V] of the prompt as given (Open-Sora's image step adds nothing)."""
    out = []
    for name, tokenizer in pipe.tokenizers.items():
        ids, _ = tokenizer.encode([prompt])
        out.append(np.asarray(pipe._loaded(name).run({"input_ids": ids})[pipe.specs[name].outputs[0].name], dtype=F32))
        pipe._done_with(name)
    return out[0], out[1]
