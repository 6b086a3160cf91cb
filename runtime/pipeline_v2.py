"""Open-Sora v2.0 text to video from a bundle, without torch.

    pipe = Pipeline.load("bundles/v2-tiny")    # osx.runtime.Pipeline picks this class by the bundle's family
    frames = pipe.generate("a red fox in the snow", seed=7, resolution="256px", aspect_ratio="16:9")

The public interface is osx.runtime.pipeline.Pipeline's (load, prepare_request, run, generate, progress
events, cancel, preload, release, timings); what differs is the model (design/opensora-v2.0.md):

  request  sizes are v2.0's buckets: a resolution ("256px", "768px") and an aspect ratio "W:H"
           (osx.models_v2.image_size), or a height x width equal to one of them; frames 4k+1.
  text     the prompt gets Open-Sora's suffixes (" 24 FPS. 4 motion score.", osx.models_v2.prepare_prompt_v2),
           the negative prompt none; both go through T5 (all tokens attended: Open-Sora passes no mask) and
           through CLIP's text tower (pooled output). Open-Sora's third text row repeats the negative.
  denoise  osx.runtime.sampler_v2 (the NumPy sampler, bit-exact against the torch reference) over the
           denoiser backend: the guidance passes of a step in one batched call where the backend's batch range
           allows, else one call per pass; the RoPE tables computed here once per video.
  decode   the VAE decoder per spatial tile as Open-Sora tiles it (osx.vae_tiling), then the first F frames
           as uint8, clamped and rounded as Open-Sora saves them.

Progress phases: "vae_encode" (a reference, first), "text_encoder" (step 1 = T5, 2 = CLIP), "denoise" (one per
step), "vae_decode" (one per tile); `progress_phases(request, reference)` announces them (osx.runtime.progress).
References (`reference_condition`), as Open-Sora's cond_types: `image` at the head, tail or both ends (i2v_head,
i2v_tail, i2v_loop), `video` at the head or the tail (v2v_head: its first 33 frames hold the clip's first 9
latent frames; v2v_tail: its last 33 the last 9; v2v_head_easy / v2v_tail_easy: 65 frames, 17 latent frames).
Each is resized to fill and centre-cropped as Open-Sora reads it (osx.runtime.conditioning: an image with PIL's
bicubic, a video with its video transform's bilinear, both in NumPy) and encoded by the bundle's VAE encoder per
spatial tile as Open-Sora tiles (osx.vae_tiling), to the posterior mean (Open-Sora samples it unseeded).
sampler_v2 builds the cond channels (mask + reference latents) and the image guidance with its ramps; after
sampling, i2v writes the reference latent back into its frames (bf16), as Open-Sora does before decoding.
Reference dtype (the manifest's scheduler.reference_dtype): "bf16" rounds the loop as Open-Sora; "fp32" rounds
nothing, so the run stays within float32 differences of its torch reference (tests/test_runtime_v2_bundle.py).
Text -> image -> video (`t2i2v`, on by default for a bundle exported `--with-t2i` when no reference is given):
runtime/t2i2v.py makes the first frame with Flux.1-dev, then runs i2v_head on it (progress adds "t2i", "t2i_decode").
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from osx.bundle import Bundle
from osx.engine_key import pick_profile
from osx.errors import BundleError, InputError
from osx.families import REFERENCE_DTYPES, get_family
from osx.models_v2 import ASPECT_RATIOS, OpenSoraV2Config, SamplerV2Config, check_frames, image_size
from osx.models_v2 import latent_shape as latent_shape_v2
from osx.models_v2 import negative_prompt_v2, prepare_prompt_v2, rope_tables
from osx.runtime import sampler_v2
from osx.runtime import t2i2v as t2i2v_flow
from osx.runtime.backends import Backend
from osx.runtime.conditioning import load_image, preprocess, preprocess_video
from osx.runtime.pipeline import Pipeline, Progress, _check_finite, _check_pixels
from osx.runtime.request import MAX_FPS, MAX_GUIDANCE_SCALE, MAX_SEED, as_float, as_int, as_size, check_int_range, check_prompt
from osx.runtime.scheduler import initial_noise, to_reference
from osx.runtime.tokenizer import TextTokenizer, check_vocabulary
from osx.runtime.video import read_frames
from osx.vae_tiling import tile_starts, tiled_decode, tiled_encode

F32 = np.float32
MAX_STEPS = 1000  # Open-Sora's reference refuses more
V2V_FRAMES = {"head": 33, "tail": 33, "head_easy": 65, "tail_easy": 65}  # 32 (64) + 1 causal -> 9 (17) latent frames


@dataclass(frozen=True)
class RequestV2:
    prompt: str
    negative_prompt: str | None
    num_frames: int
    height: int
    width: int
    fps: float  # the prompt's "<fps> FPS." suffix and the video file's rate
    steps: int
    guidance_scale: float  # text guidance
    seed: int
    resolution: str | None = None  # the bucket the size came from (None: given as height x width)
    aspect_ratio: str | None = None
    guidance_img: float | None = None  # image guidance (i2v / v2v); None: the bundle's
    t2i2v: bool | None = None  # first frame by Flux.1-dev (runtime/t2i2v.py); None: where the bundle has it, no reference given
    t2i_steps: int | None = None  # the image step's sampling steps; None: the model's (50)


class PipelineV2(Pipeline):
    SAMPLER = "rectified-flow-v2.0"
    FAMILIES = "Open-Sora v2.0"

    def __init__(self, bundle: Bundle, backends: dict[str, Backend]):
        m = bundle.manifest
        self._open(bundle, backends)
        self.model: OpenSoraV2Config
        self.sampler = _sampler_config(m.scheduler, self.model.sampler)
        batch = [p["batch"].max for p in self.run_limits["denoiser"] if "batch" in p]
        self.max_rows = max(batch) if m.runtime.cfg_batching and batch else 1  # guidance passes per denoiser call
        self.tokenizers = {name: _tokenizer(bundle, name) for name in get_family(m.model["family"]).prompt.text_encoders}

    # --- request ---------------------------------------------------------------------------------
    def sizes(self) -> list[dict]:
        """Every (resolution, aspect ratio) this bundle runs at one frame, with its pixel size (each size once)."""
        return size_buckets(self.model, self.specs, self.run_limits)

    def limits(self) -> dict:
        """{"sizes": [{"resolution", "aspect_ratio", "height", "width"}], "frames": [[first, last], ...]}."""
        return shape_limits_v2(self.model, self.specs, self.run_limits)

    def supported(self) -> str:
        return describe_limits_v2(self.limits())

    @classmethod
    def describe_onnx_limits(cls, manifest) -> str:
        specs = {n: c.io for n, c in manifest.components.items()}
        return describe_limits_v2(shape_limits_v2(manifest.model_config(), specs, {n: [s.dims] for n, s in specs.items()}))

    def prepare_request(self, prompt: str, negative_prompt: str | None = None, *, num_frames: int | None = None,
                        height: int | None = None, width: int | None = None, fps: float | None = None,
                        steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                        resolution: str | None = None, aspect_ratio: str | None = None,
                        guidance_img: float | None = None, t2i2v: bool | None = None,
                        t2i_steps: int | None = None) -> RequestV2:
        """Defaults filled in, everything checked against the bundle before any work: InputError otherwise.
        The size: `resolution` + `aspect_ratio` (each defaults to the model's), or `height` + `width` of a bucket.
        `t2i2v`, `t2i_steps`: text -> image -> video (runtime/t2i2v.py)."""
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative prompt")
        d, s = self.model.defaults, self.sampler
        hint = f"{self.model.name} bundle {self.bundle.root}: {self.supported()}"
        if (height is None) != (width is None):
            raise InputError("give both height and width, or neither (then resolution and aspect ratio pick the size)", hint=hint)
        if height is not None and (resolution is not None or aspect_ratio is not None):
            raise InputError("give a height x width or a resolution and aspect ratio, not both", hint=hint)
        if height is None:
            resolution, aspect_ratio = resolution or d.resolution, aspect_ratio or d.aspect_ratio
            try:
                height, width = image_size(self.model, resolution, aspect_ratio)
            except InputError as e:
                raise InputError(e.message, hint=f"{e.hint}; {hint}") from None
        else:
            height, width = as_size("height", height), as_size("width", width)
            named = [b for b in self.sizes() if (b["height"], b["width"]) == (height, width)]
            if not named:
                raise InputError(f"{width}x{height} (WxH) is not one of {self.model.name}'s sizes",
                                 hint=f"use a resolution and aspect ratio, or one of their sizes; {hint}")
            resolution, aspect_ratio = named[0]["resolution"], named[0]["aspect_ratio"]
        num_frames = d.num_frames if num_frames is None else as_size("frames", num_frames)
        check_frames(self.model, num_frames)
        fps = s.fps if fps is None else as_float("fps", fps, 0, MAX_FPS, low_open=True)
        steps = check_int_range("steps", s.num_steps if steps is None else as_int("steps", steps), 1, MAX_STEPS,
                                hint=f"the bundle's default is {s.num_steps}")
        guidance_scale = s.guidance if guidance_scale is None else as_float("guidance scale", guidance_scale, 0, MAX_GUIDANCE_SCALE)
        guidance_img = s.guidance_img if guidance_img is None else as_float("image guidance scale", guidance_img, 0, MAX_GUIDANCE_SCALE)
        seed = check_int_range("seed", d.seed if seed is None else as_int("seed", seed), 0, MAX_SEED)
        problem = self._size_problem(height, width, num_frames)
        if problem:
            raise InputError(f"{problem}: outside what this bundle supports", hint=hint)
        return RequestV2(prompt, negative_prompt, num_frames, height, width, fps, steps, guidance_scale, seed,
                         resolution, aspect_ratio, guidance_img, *t2i2v_flow.check_request(self, t2i2v, t2i_steps, aspect_ratio))

    def _size_problem(self, height: int, width: int, num_frames: int) -> str | None:
        return size_problem(self.model, self.specs, self.run_limits, height, width, num_frames)

    # --- stages ----------------------------------------------------------------------------------
    def text_rows(self, request: RequestV2) -> list[str]:
        """[prompt with Open-Sora's suffixes, negative prompt as given ("" when none)]."""
        return [prepare_prompt_v2(request.prompt, f"{request.fps:g}", self.sampler.motion_score),
                negative_prompt_v2(request.negative_prompt)]

    def encode_text(self, request: RequestV2, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> txt [2, L, D] (T5 states) and y_vec [2, V] (CLIP pooled) of the prompt and the negative prompt."""
        texts, out = self.text_rows(request), []
        t0 = time.perf_counter()
        for step, (name, tokenizer) in enumerate(self.tokenizers.items(), 1):
            ids, _ = tokenizer.encode(texts)  # no attention mask: Open-Sora's T5 attends to the pads
            result = self._loaded(name).run({"input_ids": ids})
            out.append(np.asarray(result[self.specs[name].outputs[0].name], dtype=F32))
            self._done_with(name)
            self._report(progress, "text_encoder", step, len(self.tokenizers), 0.0)
        self.timings["text_encoder_s"] = time.perf_counter() - t0
        return out[0], out[1]

    def latent_shape(self, request: RequestV2) -> tuple[int, ...]:
        return (1, *latent_shape_v2(self.model, request.height, request.width, request.num_frames))

    def initial_noise(self, request: RequestV2) -> np.ndarray:
        return initial_noise(request.seed, self.latent_shape(request))

    def progress_phases(self, request: RequestV2, reference: bool = False) -> list[tuple[str, int]]:
        """The (phase, total) events `run(request)` reports, in order (osx.runtime.progress)."""
        if t2i2v_flow.wanted(self, request, image=reference or None):  # text -> image -> video: the image is the reference
            head = [("text_encoder", len(self.tokenizers)), *t2i2v_flow.t2i_phases(self, request.t2i_steps), ("vae_encode", 1)]
        else:
            head = [("vae_encode", 1)] * reference + [("text_encoder", len(self.tokenizers))]
        return [*head, ("denoise", request.steps),
                ("vae_decode", decode_tile_count(self.model.vae, self.latent_shape(request)))]

    def denoise(self, request: RequestV2, txt: np.ndarray, y_vec: np.ndarray, noise: np.ndarray | None = None,
                progress: Progress | None = None, condition=None) -> np.ndarray:
        """The sampler from `noise` (default: seeded by the request) -> the final latent [1, 16, T, h, w]
        (float32 holding values of the reference dtype). `condition`: (cond_type, masks, masked_ref, reference latents) of `reference_condition`."""
        shape = self.latent_shape(request)
        z = self.initial_noise(request) if noise is None else np.asarray(noise, dtype=F32)
        if z.shape != shape:
            raise InputError(f"noise has shape {z.shape}, expected {shape}", hint="or pass a seed")
        cond_type, masks, masked_ref, refs = condition or ("t2v", *sampler_v2.condition("t2v", shape, []), [])
        _, _, T, h, w = shape
        p = self.model.mmdit.patch_size
        rope = rope_tables(self.model.mmdit, T, h // p, w // p)
        denoiser = self._loaded("denoiser")
        names = [t.name for t in self.specs["denoiser"].inputs]
        out_name = self.specs["denoiser"].outputs[0].name
        steps, t_start, model_s = [], time.perf_counter(), [0.0]
        is_finite = np.empty(3 * z.size, bool)  # the output check's scratch (3 rows at most): no allocation per step
        step_start = [t_start]

        def model(img, txt_rows, t, y, cond):
            """The denoiser on these rows, in calls of at most max_rows rows. A NaN or inf in its output stops the
            run at that step (the sampler then need not look for NaNs; a latent that overflows on its own shows
            in the next step's output or in the decoded frames)."""
            outs = []
            for a in range(0, img.shape[0], self.max_rows):
                rows = slice(a, a + self.max_rows)
                feed = {"img": img[rows], "txt": txt_rows[rows], "timestep": t[rows], "y_vec": y[rows], "cond": cond[rows],
                        "rope_cos": rope[0], "rope_sin": rope[1]}
                t1 = time.perf_counter()
                outs.append(denoiser.run({k: feed[k] for k in names})[out_name])
                model_s[0] += time.perf_counter() - t1
            v = outs[0] if len(outs) == 1 else np.concatenate(outs)  # the sampler takes it as float32
            if np.count_nonzero(np.isfinite(v, out=is_finite[: v.size].reshape(v.shape))) != v.size:
                _check_finite(v, f"the denoiser's output at step {len(steps) + 1} of {request.steps}")  # raises
            return v

        def on_start() -> None:  # the run's inputs are packed and rounded: per-run work, not a step's
            step_start[0] = time.perf_counter()
            self.timings["denoise_setup_s"] = step_start[0] - t_start

        def on_step(i: int, x: np.ndarray) -> None:
            now = time.perf_counter()
            done = now - t_start
            steps.append({"total_s": now - step_start[0], "denoiser_s": model_s[0]})
            step_start[0], model_s[0] = now, 0.0
            self._report(progress, "denoise", i + 1, request.steps, done / (i + 1) * (request.steps - i - 1))

        latent = sampler_v2.denoise(model, z, txt, y_vec, masks=masks, masked_ref=masked_ref, cond_type=cond_type,
                                    cfg=self.sampler, patch_size=p, num_steps=request.steps, guidance=request.guidance_scale,
                                    guidance_img=request.guidance_img, finite_outputs=True, on_start=on_start, on_step=on_step)
        self._done_with("denoiser")
        self.timings.update(denoise_s=time.perf_counter() - t_start, steps=steps)
        # Open-Sora writes the reference frame(s) back before decoding (i2v; also for a one-frame video)
        if cond_type in ("i2v_head", "i2v_loop"):
            latent[:, :, :1] = to_reference(refs[0][:, :, :1], self.sampler.reference_dtype)
        if cond_type in ("i2v_tail", "i2v_loop"):
            latent[:, :, -1:] = to_reference(refs[-1][:, :, -1:], self.sampler.reference_dtype)
        return latent

    def _run(self, request, noise, progress, image, condition, video, extend) -> np.ndarray:
        if t2i2v_flow.wanted(self, request, image, video):
            return t2i2v_flow.run(self, request, noise, progress)
        return super()._run(request, noise, progress, image, condition, video, extend)

    # --- references (i2v / v2v) ----------------------------------------------------------------------
    def read_reference_video(self, path, condition: str = "head") -> np.ndarray:
        """The first (v2v_head*) or last (v2v_tail*) V2V_FRAMES frames of a video file."""
        return read_frames(path, V2V_FRAMES.get(condition, 33), end=condition.startswith("tail"))

    def reference_modes(self) -> dict[str, list[str]]:
        return {"image": ["head", "tail", "loop"], "video": list(V2V_FRAMES)} if "vae_encoder" in self.backends else {}

    def check_references(self, request: RequestV2, *, image=None, condition: str = "head", video=None, extend: int = 0) -> int:
        t2i2v_flow.wanted(self, request, image, video)  # t2i2v takes no reference
        return super().check_references(request, image=image, condition=condition, video=video, extend=extend)

    def reference_condition(self, request: RequestV2, image=None, video=None, condition: str = "head", progress=None,
                            encode: bool = True):
        """(cond_type, masks, masked_ref, reference latents) for sampler_v2 and the i2v write-back, or None
        (also without `encode`: every check of the reference, which is read, and nothing encoded)."""
        if image is None and video is None:
            return None
        if image is not None and video is not None:
            raise InputError("a reference image and a reference video were both given", hint="pass one: --image or --video")
        what, modes = ("image", ("head", "tail", "loop")) if video is None else ("video", tuple(V2V_FRAMES))
        if condition not in modes:
            raise InputError(f"condition {condition!r} is not one of {', '.join(modes)} for a reference {what}")
        if "vae_encoder" not in self.backends:
            raise BundleError(f"this bundle has no VAE encoder, which a reference {what} needs",
                              hint="re-export it with `osx export ... --with-vae-encoder`")
        if video is None:
            pixels = load_image(image) if not isinstance(image, np.ndarray) else image
            _check_pixels(pixels, "reference image array", "uint8 [H, W, 3] RGB")
            clip = preprocess(pixels, request.height, request.width)  # [3, 1, H, W]
        else:
            frames = self.read_reference_video(video, condition) if not isinstance(video, np.ndarray) else video
            _check_pixels(frames, "reference video array", "uint8 [F, H, W, 3] RGB")
            n, cond_type = V2V_FRAMES[condition], f"v2v_{condition}"
            if len(frames) < n:
                raise InputError(f"{cond_type} needs a reference video of at least {n} frames, got {len(frames)}")
            # a clip shorter than the frames it holds is refused before anything is encoded
            sampler_v2.condition(cond_type, self.latent_shape(request), [np.zeros((1, 1, n // 4 + 1, 1, 1), F32)])
            frames = frames[:n] if condition.startswith("head") else frames[-n:]
            clip = preprocess_video(frames, request.height, request.width)  # [3, F, H, W]
        if not encode:
            return None
        z = self.encode_reference(clip, progress)
        cond_type = f"{'i2v' if video is None else 'v2v'}_{condition}"
        refs = [z, z] if cond_type == "i2v_loop" else [z]
        return (cond_type, *sampler_v2.condition(cond_type, self.latent_shape(request), refs), refs)

    def _encode(self, encoder: Backend, video: np.ndarray) -> np.ndarray:
        """The normalised posterior mean per spatial tile, blended as Open-Sora tiles (the normalisation is
        affine per position, so blending normalised tiles equals normalising the blend)."""
        spec = self.bundle.spec("vae_encoder")
        vae = self.model.vae
        run = lambda tile: np.asarray(encoder.run({spec.inputs[0].name: np.ascontiguousarray(tile)})[spec.outputs[0].name], F32)
        return tiled_encode(run, video, vae, vae.use_spatial_tiling, vae.use_temporal_tiling)

    def check_extend(self, request: RequestV2, extend: int) -> None:
        if extend:
            raise InputError(f"video extension (extend) is not available for {self.model.name} bundles",
                             hint="condition on a video's first or last frames with --video and --condition head|tail")

    def decode(self, latent: np.ndarray, num_frames: int, progress: Progress | None = None) -> np.ndarray:
        """Latent [1, 16, T, h, w] -> video [3, num_frames, 8h, 8w] float32 in about [-1, 1]: the decoder per
        tile as Open-Sora tiles (overlapping tiles cross-faded), then the first `num_frames` frames."""
        vae = self.model.vae
        spec = self.specs["vae_decoder"]
        decoder = self._loaded("vae_decoder")
        total, done, t_start = decode_tile_count(vae, latent.shape), [0], time.perf_counter()

        def decode_tile(z: np.ndarray) -> np.ndarray:
            video = np.array(decoder.run({spec.inputs[0].name: np.ascontiguousarray(z)})[spec.outputs[0].name], dtype=F32)
            done[0] += 1
            _check_finite(video, f"the frames of VAE tile {done[0]} of {total}")
            seconds = time.perf_counter() - t_start
            self._report(progress, "vae_decode", done[0], total, seconds / done[0] * max(total - done[0], 0))
            return video

        video = tiled_decode(decode_tile, latent.astype(F32), vae, vae.use_spatial_tiling, vae.use_temporal_tiling)
        self._done_with("vae_decoder")
        self.timings["vae_decode_s"] = time.perf_counter() - t_start
        return video[0, :, :num_frames]

    def generate(self, prompt: str, negative_prompt: str | None = None, *, noise: np.ndarray | None = None,
                 progress: Progress | None = None, image=None, condition: str = "head", video=None, extend: int = 0,
                 **request) -> np.ndarray:
        """One video: uint8 frames [num_frames, H, W, 3]. `request`: prepare_request's keywords (num_frames,
        resolution, aspect_ratio or height and width, fps, steps, guidance_scale, guidance_img, seed); unset ones
        take the bundle's defaults. `noise` [1, 16, T_lat, h, w] replaces the seeded noise. `image` / `video`
        with `condition`: the references of `reference_condition`. `t2i2v`, `t2i_steps`: text -> image -> video."""
        return self.run(self.prepare_request(prompt, negative_prompt, **request), noise, progress, image=image,
                        condition=condition, video=video, extend=extend)


# --- what a bundle runs (from its specs and the backends' shape profiles) -------------------------------


def denoiser_inputs(model: OpenSoraV2Config, rows: int, T: int, h: int, w: int) -> dict[str, np.ndarray]:
    """Placeholders (shapes only, no memory) of one denoiser call on `rows` rows of a [16, T, h, w] latent."""
    m = model.mmdit
    p, L = m.patch_size, model.t5.max_length
    n = T * (h // p) * (w // p)
    shapes = {"img": (rows, n, m.in_channels), "txt": (rows, L, m.context_in_dim), "timestep": (rows,),
              "y_vec": (rows, m.vec_in_dim), "cond": (rows, n, m.cond_channels), "rope_cos": (n, m.head_dim),
              "rope_sin": (n, m.head_dim)}
    return {k: np.broadcast_to(F32(0), s) for k, s in shapes.items()}


def decode_tile_shape(vae, T: int, h: int, w: int) -> tuple[int, ...]:
    """The largest latent tile osx.vae_tiling hands the VAE decoder."""
    t = vae.tile_latent_size
    if vae.use_spatial_tiling and max(h, w) > t:
        h, w = min(h, t), min(w, t)
    if vae.use_temporal_tiling and T > vae.tile_latent_tsize:
        T = vae.tile_latent_tsize + 1
    return (1, vae.latent_channels, T, h, w)


def size_problem(model: OpenSoraV2Config, specs: dict, run_limits: dict, height: int, width: int, num_frames: int) -> str | None:
    """What of this size the denoiser or the VAE decoder cannot run (`run_limits`: their engine profiles or
    ONNX ranges), or None."""
    _, T, h, w = latent_shape_v2(model, height, width, num_frames)
    den, vae = specs["denoiser"], specs["vae_decoder"]
    feed = denoiser_inputs(model, 1, T, h, w)
    sizes = den.sizes_of({t.name: feed[t.name] for t in den.inputs})
    if pick_profile(run_limits["denoiser"], sizes) is None:
        return f"{width}x{height} (WxH) with {num_frames} frames"
    tile = np.broadcast_to(F32(0), decode_tile_shape(model.vae, T, h, w))
    if pick_profile(run_limits["vae_decoder"], vae.sizes_of({vae.inputs[0].name: tile})) is None:
        return f"{width}x{height} (WxH) with {num_frames} frames (VAE decoder)"
    return None


def size_buckets(model: OpenSoraV2Config, specs: dict, run_limits: dict) -> list[dict]:
    """Every (resolution, aspect ratio) the bundle runs at one frame, with its pixel size (each size once)."""
    out, seen = [], set()
    for res in model.resolutions:
        for ar in ASPECT_RATIOS:
            try:
                h, w = image_size(model, res, ar)
            except InputError:
                continue
            if (h, w) not in seen and size_problem(model, specs, run_limits, h, w, 1) is None:
                seen.add((h, w))
                out.append({"resolution": res, "aspect_ratio": ar, "height": h, "width": w})
    return out


def shape_limits_v2(model: OpenSoraV2Config, specs: dict, run_limits: dict) -> dict:
    """{"sizes": size_buckets, "frames": [[first, last], ...]}: the 4k+1 frame counts the smallest size runs."""
    sizes = size_buckets(model, specs, run_limits)
    frames = [] if not sizes else [f for f in range(1, model.max_frames + 1, model.temporal_downsample)
                                   if size_problem(model, specs, run_limits, sizes[0]["height"], sizes[0]["width"], f) is None]
    return {"sizes": sizes, "frames": [[f, f] for f in frames]}


def describe_limits_v2(lim: dict) -> str:
    sizes = ", ".join(f"{b['resolution']} {b['aspect_ratio']} = {b['width']}x{b['height']} (WxH)" for b in lim["sizes"])
    frames = [f for f, _ in lim["frames"]]
    counts = ", ".join(map(str, frames)) if len(frames) <= 6 else f"{frames[0]}, {frames[1]}, ..., {frames[-1]} (4k+1)"
    return f"sizes {sizes or '(none)'}; frames {counts or '(none)'}"


# --- helpers ---------------------------------------------------------------------------------------------


def decode_tile_count(vae, shape: tuple[int, ...]) -> int:
    """How many times osx.vae_tiling.tiled_decode calls the decoder for latents of `shape` [B, C, T, h, w]."""
    T, h, w = shape[2:]
    t = vae.tile_latent_size
    spatial = 1
    if vae.use_spatial_tiling and max(h, w) > t:
        stride = int(t * (1 - vae.tile_overlap_factor))
        spatial = len(tile_starts(h, stride)) * len(tile_starts(w, stride))
    tt = vae.tile_latent_tsize
    temporal = len(tile_starts(T, int(tt * (1 - vae.tile_overlap_factor)))) if vae.use_temporal_tiling and T > tt else 1
    return spatial * temporal


def _sampler_config(scheduler: dict, default: SamplerV2Config) -> SamplerV2Config:
    """The manifest's sampler settings over the model config's (unknown keys refused as a bundle error)."""
    known = {f.name for f in dataclasses.fields(SamplerV2Config)}
    unknown = sorted(set(scheduler) - known)
    if unknown:
        raise BundleError(f"the bundle's scheduler has settings this osx does not know: {unknown}",
                          hint="install the osx version that wrote it, or re-export the bundle")
    if scheduler.get("reference_dtype", default.reference_dtype) not in REFERENCE_DTYPES:
        raise BundleError(f"the bundle's reference dtype {scheduler['reference_dtype']!r} is not one of {', '.join(REFERENCE_DTYPES)}",
                          hint="re-export the bundle with `osx export --reference-dtype bf16|fp32`")
    return dataclasses.replace(default, **scheduler)


def _tokenizer(bundle: Bundle, encoder: str) -> TextTokenizer:
    """The tokenizer of one text encoder, as the manifest lists it (`tokenizer.encoders`), checked against the
    encoder's spec: its length is the encoder's input_ids length, its ids fit the encoder's embedding."""
    entry = bundle.manifest.tokenizer.get("encoders", {}).get(encoder)
    spec = bundle.spec(encoder)
    if entry is None:
        raise BundleError(f"{bundle.root}: the manifest lists no tokenizer for {encoder}", hint="re-export the bundle with `osx export`")
    if entry["max_length"] != spec.inputs[0].shape[1]:
        raise BundleError(f"{bundle.root}: {encoder}'s tokenizer makes {entry['max_length']} tokens, the encoder takes "
                          f"{spec.inputs[0].shape[1]}", hint="the bundle is inconsistent; re-export it")
    tokenizer = TextTokenizer(bundle.path(entry["file"]), entry["max_length"], pad_token=entry.get("pad_token", "<pad>"))
    check_vocabulary(tokenizer.vocab_size, spec.vocab_size, f"{bundle.root}: {entry['file']}")
    return tokenizer
