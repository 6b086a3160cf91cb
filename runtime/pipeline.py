"""Text to video from a bundle, without torch.

    pipe = Pipeline.load("bundles/tiny")
    frames = pipe.generate("a red fox in the snow", seed=7)        # uint8 [F, H, W, 3]

Stages (each public, so tests and tools can stop in between):
  request  `prepare_request`: defaults from the bundle, every input checked against the manifest's
           ranges before any work; an error lists what the bundle supports.
  text     `encode_text`: prompt preparation (osx.runtime.prompt), tokenizer, T5. The unconditional
           half is the learned null caption, or the T5 embedding of `negative_prompt`; both halves use
           the prompt's token mask, as Open-Sora repeats the one mask (see osx.export.pipeline).
  denoise  `denoise`: NumPy rectified flow (osx.runtime.scheduler) over the denoiser, cond + uncond in
           one batch-2 call when the bundle allows it, else two batch-1 calls.
  decode   `decode`: the VAE decoder one 5-latent-frame chunk at a time, each chunk's front padding
           dropped (17 pixel frames per chunk), then uint8 frames as Open-Sora saves them.

Shapes: a request is checked against what each backend actually runs: the shape profiles of the TensorRT
engine it loads for this GPU (engines for other GPUs may have other buckets), or the ONNX ranges.

Memory: with `load_one_at_a_time` (the loaded engine's plan, or the manifest's runtime settings), each
component is released after its stage (T5 before the denoising loop), so at most one is loaded at a time.

Progress and cancelling: `progress(event)` is called with a dict {"phase": "vae_encode" (a reference) |
"text_encoder" | "denoise" | "vae_decode", "step": k, "total": n, "elapsed": seconds since generate started, "eta": seconds the
phase still needs} (osx.runtime.progress: every family's phases; `progress_phases(request)` lists a run's). Returning False from it, or calling `pipeline.cancel()` from another thread, stops
the run between two steps with `GenerationCancelled`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from osx.bundle import Bundle
from osx.components import DimRange
from osx.engine_key import pick_profile
from osx.errors import BundleError, InputError, OsxError
from osx.manifest import Manifest
from osx.families import get_family, resolve
from osx.models import IMAGE_FPS, ModelConfig, SchedulerConfig, latent_frames, latent_size
from osx.runtime import scheduler as rf
from osx.runtime.backends import Backend, create_backend
from osx.runtime.conditioning import (
    CONDITIONS, Condition, MaskSchedule, extension_noise, load_image, preprocess, preprocess_video,
)
from osx.runtime.progress import Progress
from osx.runtime.prompt import prepare_prompt
from osx.runtime.request import (
    MAX_EXTEND, MAX_FPS, MAX_GUIDANCE_SCALE, MAX_SEED, as_float, as_int, as_size, check_int_range, check_prompt,
)
from osx.runtime.tokenizer import TextTokenizer, check_vocabulary
from osx.runtime.video import read_frames, to_uint8_frames

OPTIONAL_COMPONENTS = ("vae_encoder", "t2i_denoiser", "t2i_decoder")  # loaded when the bundle has them
SAMPLER = "rectified-flow-v1.2"  # the sampler kind (osx.families.SamplerDecl) this loop implements


class GenerationCancelled(Exception):
    """The progress callback returned False or `Pipeline.cancel()` was called."""


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str | None
    num_frames: int
    height: int
    width: int
    fps: float
    steps: int
    guidance_scale: float
    seed: int


class Pipeline:
    SAMPLER = SAMPLER  # the sampler kind (osx.families SamplerDecl.kind) of the families this class runs
    FAMILIES = "Open-Sora v1.2"

    def __init__(self, bundle: Bundle, backends: dict[str, Backend]):
        m = bundle.manifest
        self._open(bundle, backends)
        self.model: ModelConfig
        self.scheduler = SchedulerConfig(**m.scheduler)
        self.cfg_batching = m.runtime.cfg_batching and max(p["batch"].max for p in self.run_limits["denoiser"]) >= 2
        # Engines built for static buckets run those shapes; name them (the ranges would say nothing)
        static = all(r.min == r.max for p in self.run_limits["denoiser"] for d, r in p.items() if d != "batch")
        self.buckets = _buckets(backends["denoiser"]) if static else []
        tok = m.tokenizer
        self.tokenizer = TextTokenizer(bundle.path(tok["file"]), tok["max_length"])
        check_vocabulary(self.tokenizer.vocab_size, self.specs["text_encoder"].vocab_size, f"{bundle.root}: {tok['file']}")
        self.null_text = _load_null_text(bundle, self.specs["denoiser"])

    def _open(self, bundle: Bundle, backends: dict[str, Backend]) -> None:
        """What every family's pipeline holds: the bundle, its model config, the components, their specs and
        backends, the shapes each backend runs (its engine's profiles for this GPU, or the ONNX ranges)."""
        m = bundle.manifest
        self.bundle = bundle
        self.model = bundle.model_config()
        self.backends = backends
        self.components = self.required_components(bundle)
        self.specs = {name: bundle.spec(name) for name in self.components}
        own = [getattr(b, "load_one_at_a_time", None) for b in backends.values()]
        self.load_one_at_a_time = any(m.runtime.load_one_at_a_time if v is None else v for v in own)
        self.run_limits = {name: _limits(backends[name], self.specs[name]) for name in ("denoiser", "vae_decoder")}
        self.timings: dict = {}
        self._cancel = threading.Event()
        self._clip, self._clips = 0, 1  # video extension: the clip being made, of how many
        self.resident = False  # preload() asked to keep what is loaded loaded (osx serve's replicas)

    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, backend: str | None = None, *, verify: bool = True) -> "Pipeline":
        """Open a bundle (checking its files: sizes, and sha256 unless verify=False) and pick each
        component's backend (`backend` for all, else the manifest's). Components load on first use."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.open(bundle, verify=False)
            bundle.verify(checksums=verify)
        runs = pipeline_class(bundle)  # the pipeline of the bundle's family: this one, or (from Pipeline) its own
        if runs is not cls:
            if cls is not Pipeline:
                cls.required_components(bundle)  # refuses with the reason
            return runs.load(bundle, backend, verify=verify)
        missing = [c for c in cls.required_components(bundle) if c not in bundle.components]
        if missing:
            raise BundleError(f"{bundle.root}: bundle lacks {', '.join(missing)}", hint="re-export it with `osx export`")
        # optional: the VAE encoder (image conditioning), Flux.1-dev and its decoder (v2.0's t2i2v image step)
        used = cls.required_components(bundle) + tuple(c for c in OPTIONAL_COMPONENTS if c in bundle.components)
        return cls(bundle, {c: create_backend(bundle, c, backend) for c in used})

    @classmethod
    def required_components(cls, bundle: Bundle) -> tuple[str, ...]:
        """The text-to-video components of the bundle's family; refused if its sampler is not this class's."""
        family = get_family(bundle.manifest.model["family"])
        if family.sampler.kind != cls.SAMPLER:
            raise BundleError(f"{bundle.root}: {family.name} samples with {family.sampler.kind!r}; {cls.__name__} runs "
                              f"{cls.SAMPLER!r} ({cls.FAMILIES})",
                              hint="open it with osx.runtime.Pipeline.load, which picks the pipeline of the bundle's family")
        return family.names(pipeline_only=True)

    @classmethod
    def describe_onnx_limits(cls, manifest: Manifest) -> str:
        """What `generate` accepts on onnxruntime (the manifest's ONNX ranges), without loading anything."""
        limits = {n: [manifest.components[n].io.dims] for n in ("denoiser", "vae_decoder")}
        return describe_limits(shape_limits(manifest.model_config(), limits))

    # --- request ---------------------------------------------------------------------------------
    def supported(self) -> str:
        """What this bundle can generate, in pixels and frames."""
        return describe_limits(self.limits())

    def limits(self) -> dict:
        """`supported()` as data (see `shape_limits`)."""
        return shape_limits(self.model, self.run_limits, self.buckets)

    def _frames_ok(self, f: int) -> bool:
        return _frames_ok(self.model, self.run_limits, f)

    def prepare_request(self, prompt: str, negative_prompt: str | None = None, *, num_frames: int | None = None,
                        height: int | None = None, width: int | None = None, fps: float | None = None,
                        steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                        resolution: str | None = None, aspect_ratio: str | None = None,
                        guidance_img: float | None = None, t2i2v: bool | None = None, t2i_steps: int | None = None) -> Request:
        """Fill in defaults and check everything against the bundle. Raises InputError naming the
        problem and what is supported; nothing has been computed yet. (`resolution` names and `aspect_ratio`
        are Open-Sora v2.0's size buckets: refused here, where sizes are width and height.)"""
        if resolution is not None or aspect_ratio is not None:
            raise InputError(f"{self.model.name} takes a size as width x height (e.g. --resolution 426x240), "
                             f"not a resolution name or aspect ratio ({resolution or aspect_ratio!r})",
                             hint=f"{self.model.name} bundle {self.bundle.root}: {self.supported()}")
        if guidance_img is not None:  # Open-Sora v2.0's image guidance
            raise InputError(f"{self.model.name} has no image guidance scale: its references are held, not guided",
                             hint="drop the image guidance scale")
        if t2i2v or t2i_steps is not None:  # Open-Sora v2.0's text -> image -> video
            raise InputError(f"{self.model.name} has no text-to-image step (t2i2v is Open-Sora v2.0's, with Flux.1-dev)",
                             hint="drop --t2i2v; for a first frame of your own, pass it as --image")
        check_prompt(prompt)
        check_prompt(negative_prompt, "negative prompt")
        d, s = self.model.defaults, self.scheduler
        if self.buckets and num_frames is None and height is None and width is None:
            height, width, num_frames = self.buckets[0]
        num_frames = d.num_frames if num_frames is None else as_size("frames", num_frames)
        height = d.height if height is None else as_size("height", height)
        width = d.width if width is None else as_size("width", width)
        fps = (IMAGE_FPS if num_frames == 1 else s.fps) if fps is None else as_float("fps", fps, 0, MAX_FPS, low_open=True)
        steps = check_int_range("steps", s.num_sampling_steps if steps is None else as_int("steps", steps), 1, s.num_timesteps,
                                hint=f"the bundle's default is {s.num_sampling_steps}; more than its {s.num_timesteps} "
                                "training timesteps only repeat work")
        guidance_scale = s.guidance_scale if guidance_scale is None else as_float(
            "guidance scale", guidance_scale, 0, MAX_GUIDANCE_SCALE)
        seed = check_int_range("seed", d.seed if seed is None else as_int("seed", seed), 0, MAX_SEED)
        request = Request(prompt, negative_prompt, num_frames, height, width, fps, steps, guidance_scale, seed)
        problem = self._shape_problem(request)
        if problem:
            raise InputError(f"{problem}: outside what this bundle supports",
                             hint=f"{self.model.name} bundle {self.bundle.root}: {self.supported()}")
        return request

    def _shape_problem(self, r: Request) -> str | None:
        shape = f"{r.width}x{r.height} (WxH) with {r.num_frames} frames"
        if self.buckets:
            return None if (r.height, r.width, r.num_frames) in self.buckets else shape
        if r.num_frames < 1 or r.height < 8 or r.width < 8:
            return shape
        if not self._frames_ok(r.num_frames):
            return f"{r.num_frames} frames"
        lh, lw = latent_size(r.height, r.width, self.model.vae)
        sizes = {"latent_frames": latent_frames(r.num_frames, self.model.vae), "latent_height": lh, "latent_width": lw}
        if pick_profile(self.run_limits["denoiser"], sizes) is None:  # the frames alone fit (checked above)
            return f"{r.width}x{r.height} (WxH)" if len(self.run_limits["denoiser"]) == 1 else shape
        if pick_profile(self.run_limits["vae_decoder"], {"latent_height": lh, "latent_width": lw}) is None:
            return f"{r.width}x{r.height} (WxH)"
        return None

    # --- stages ----------------------------------------------------------------------------------
    def encode_text(self, request: Request, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> y [2, L, C] (cond, uncond) and mask [2, L] (the prompt's mask twice)."""
        encoder = self._loaded("text_encoder")
        t0 = time.perf_counter()
        ids, mask = self.tokenizer.encode([prepare_prompt(request.prompt, self.scheduler.aesthetic_score)])
        y_cond = encoder.run({"input_ids": ids, "attention_mask": mask})["text_embeds"]
        if request.negative_prompt is None:
            y_uncond = self.null_text[None]
        else:
            neg_ids, neg_mask = self.tokenizer.encode([prepare_prompt(request.negative_prompt, aesthetic_score=None, warn_empty=False)])
            y_uncond = encoder.run({"input_ids": neg_ids, "attention_mask": neg_mask})["text_embeds"]
        self._done_with("text_encoder")
        self.timings["text_encoder_s"] = time.perf_counter() - t0
        self._report(progress, "text_encoder", 1, 1, 0.0)
        y = np.concatenate([y_cond, y_uncond]).astype(np.float32, copy=False)
        return y, np.concatenate([mask, mask])

    def initial_noise(self, request: Request) -> np.ndarray:
        return rf.initial_noise(request.seed, self.latent_shape(request))

    def progress_phases(self, request: Request, reference: bool = False) -> list[tuple[str, int]]:
        """The (phase, total) events `run(request)` reports, in order (osx.runtime.progress); `reference`: the run
        has a reference image or video (its encoding comes first)."""
        chunks = -(-self.latent_shape(request)[2] // self.model.vae.micro_z_frame_size)
        return [("vae_encode", 1)] * reference + [("text_encoder", 1), ("denoise", request.steps), ("vae_decode", chunks)]

    def latent_shape(self, request: Request) -> tuple[int, ...]:
        vae = self.model.vae
        return (1, vae.temporal.latent_embed_dim, latent_frames(request.num_frames, vae), *latent_size(request.height, request.width, vae))

    def denoise(self, request: Request, y: np.ndarray, mask: np.ndarray, noise: np.ndarray | None = None,
                progress: Progress | None = None, condition: Condition | None = None) -> np.ndarray:
        """Rectified-flow sampling from `noise` (default: seeded by the request) -> final latent.
        `condition` (osx.runtime.conditioning) holds reference latents fixed in given frames."""
        s = self.scheduler
        z = self.initial_noise(request) if noise is None else np.array(noise, dtype=np.float32)
        if z.shape != self.latent_shape(request):
            raise InputError(f"noise has shape {z.shape}, expected {self.latent_shape(request)}", hint="or pass a seed")
        # bundles exported before x_mask existed run text-to-video only (`condition` is refused for them)
        x_mask_input = any(t.name == "x_mask" for t in self.specs["denoiser"].inputs)
        masking = MaskSchedule(condition, request.seed, x_mask_input)
        z = masking.start(z)
        ts = rf.timesteps(request.steps, request.height, request.width, request.num_frames, num_timesteps=s.num_timesteps,
                          use_timestep_transform=s.use_timestep_transform, base_resolution=s.base_resolution,
                          reference_dtype=s.reference_dtype)
        dts = rf.dts(ts, s.num_timesteps)
        # What the real (bf16) model sees; the exported graph rounds these too, so this is idempotent there
        # and keeps a backend whose own bf16 cast rounds differently exact.
        t_model = rf.to_reference(ts, s.reference_dtype)
        sizes = {k: rf.to_reference(np.full(2, v, np.float32), s.reference_dtype) for k, v in
                 (("fps", request.fps), ("height", request.height), ("width", request.width))}
        denoiser = self._loaded("denoiser")
        steps, t_start = [], time.perf_counter()
        for i in range(request.steps):
            t0 = time.perf_counter()
            z, x_mask = masking.before_step(z, ts[i], s.num_timesteps)
            if self.cfg_batching:  # one call: rows (cond, uncond)
                calls = [{"x": np.concatenate([z, z]), "timestep": np.full(2, t_model[i], np.float32), "y": y, "mask": mask,
                          **sizes, **({"x_mask": np.concatenate([x_mask, x_mask])} if x_mask_input else {})}]
            else:  # two calls of batch 1
                calls = [{"x": z, "timestep": t_model[i:i + 1], "y": y[k:k + 1], "mask": mask[k:k + 1],
                          **{n: a[:1] for n, a in sizes.items()}, **({"x_mask": x_mask} if x_mask_input else {})} for k in (0, 1)]
            v, model_s = [], 0.0
            for inputs in calls:
                t1 = time.perf_counter()
                v.append(denoiser.run(inputs)["v"])
                model_s += time.perf_counter() - t1
            v_cond, v_uncond = np.split(np.concatenate(v).astype(np.float32, copy=False), 2)
            z = masking.after_step(rf.step(z, rf.guidance(v_cond, v_uncond, request.guidance_scale), dts[i]))
            _check_finite(z, f"the latent after denoising step {i + 1} of {request.steps}")
            steps.append({"total_s": time.perf_counter() - t0, "denoiser_s": model_s})
            done = time.perf_counter() - t_start
            self._report(progress, "denoise", i + 1, request.steps, done / (i + 1) * (request.steps - i - 1))
        self._done_with("denoiser")
        self.timings.update(denoise_s=time.perf_counter() - t_start, steps=steps)
        return z

    def condition_on(self, image: str | os.PathLike | np.ndarray, where: str, request: Request,
                     progress: Progress | None = None, encode: bool = True) -> Condition | None:
        """The reference image's latent (VAE encoder, posterior mean) placed at the `where` frames (None
        without `encode`: the image read and checked only)."""
        if where not in CONDITIONS:
            raise InputError(f"condition {where!r} is not one of {', '.join(CONDITIONS)}")
        self._check_conditioning("image conditioning")
        pixels = load_image(image) if not isinstance(image, np.ndarray) else image
        _check_pixels(pixels, "reference image array", "uint8 [H, W, 3] RGB")
        lh, lw = latent_size(request.height, request.width, self.model.vae)
        if not encode:
            return None
        z = self.encode_reference(preprocess(pixels, 8 * lh, 8 * lw), progress)
        return Condition.image(z[:, :, :1], latent_frames(request.num_frames, self.model.vae), where)

    def continue_video(self, video: str | os.PathLike | np.ndarray, request: Request, progress: Progress | None = None,
                       encode: bool = True) -> Condition | None:
        """The last VAE chunk of `video` (a file, or uint8 [F, H, W, 3] RGB frames) held at the first latent
        frames of the clip: Open-Sora's video continuation (osx.runtime.conditioning). None without `encode`."""
        self._check_conditioning("continuing a video")
        chunk = self.model.vae.micro_frame_size
        frames = self.read_reference_video(video, "head") if not isinstance(video, np.ndarray) else video[-chunk:]
        _check_pixels(frames, "reference video array", "uint8 [F, H, W, 3] RGB")
        lh, lw = latent_size(request.height, request.width, self.model.vae)
        if not encode:
            return None
        return Condition.head(self.encode_reference(preprocess_video(frames, 8 * lh, 8 * lw), progress),
                              latent_frames(request.num_frames, self.model.vae))

    def read_reference_video(self, path: str | os.PathLike, condition: str = "head") -> np.ndarray:
        """The frames of a reference video file that `condition` uses (v1.2 continues a video: its last chunk)."""
        return read_frames(path, self.model.vae.micro_frame_size)

    def reference_condition(self, request: Request, image=None, video=None, condition: str = "head",
                            progress: Progress | None = None, encode: bool = True) -> Condition | None:
        """What a request's reference conditions on: an image at the `condition` frames, or a video continued
        (its encoding reported to `progress` as phase "vae_encode"). Without `encode`, only every check of
        the reference (it is read) and None."""
        if image is not None and video is not None:
            raise InputError("a reference image and a reference video were both given",
                             hint="pass one: --image (image-to-video) or --video (continue a video)")
        if image is not None:
            return self.condition_on(image, condition, request, progress, encode)
        if video is None:
            return None
        if condition != "head":
            raise InputError(f"a reference video is continued at the head; condition {condition!r} places images",
                             hint="drop the condition for --video")
        return self.continue_video(video, request, progress, encode)

    def _checked_extend(self, request: Request, extend) -> int:
        extend = check_int_range("extend", as_int("extend", extend), 0, MAX_EXTEND,
                                 hint=f"append at most {MAX_EXTEND} clips in one request")
        self.check_extend(request, extend)
        return extend

    def reference_modes(self) -> dict[str, list[str]]:
        """The conditions a reference image / video can take with this bundle ({} without a VAE encoder)."""
        return {"image": list(CONDITIONS), "video": ["head"]} if "vae_encoder" in self.backends else {}

    def check_extend(self, request: Request, extend: int) -> None:
        """Video extension's checks, before any work: the bundle can condition, the clip is longer than a chunk."""
        if extend:
            self._check_conditioning("video extension")
            Condition.head(np.zeros((1, 1, self.model.vae.micro_z_frame_size, 1, 1), np.float32),
                           latent_frames(request.num_frames, self.model.vae))

    def encode_reference(self, pixels: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        """Pixels [3, f <= 17, H, W] in [-1, 1] -> model-normalised latents [1, C, ceil(f / 4), H/8, W/8]. The
        encoder runs alone (the plan counts its memory so): loaded components are released first (with
        everything resident, video extension reloads them for each clip), the encoder after. A preloaded
        pipeline (`resident`, unless loading one at a time) releases nothing and keeps the encoder too once loaded: its memory then adds to
        the plan's, and no request reloads anything."""
        keep = self.resident and not self.load_one_at_a_time
        if not keep:  # it runs alone, as the plan counts its memory
            for name, backend in self.backends.items():
                if name != "vae_encoder" and backend.loaded:
                    backend.release()
        t0 = time.perf_counter()
        z = self._encode(self._loaded("vae_encoder"), pixels[None].astype(np.float32, copy=False))
        if not keep:
            self.backends["vae_encoder"].release()
        self.timings["vae_encode_s"] = self.timings.get("vae_encode_s", 0.0) + time.perf_counter() - t0
        _check_finite(z, "the VAE encoder's latent of the reference")
        self._report(progress, "vae_encode", 1, 1, 0.0)
        return z.astype(np.float32, copy=False)

    def _encode(self, encoder: Backend, video: np.ndarray) -> np.ndarray:
        return encoder.run({"video": video})["z"]

    def _check_conditioning(self, what: str) -> None:
        if not any(t.name == "x_mask" for t in self.specs["denoiser"].inputs):
            raise BundleError(f"this bundle's denoiser has no x_mask input (exported before {what} existed)",
                              hint="re-export it with this osx version: `osx export ... --with-vae-encoder`")
        if "vae_encoder" not in self.backends:
            raise BundleError(f"this bundle has no VAE encoder, which {what} needs",
                              hint="re-export it with `osx export ... --with-vae-encoder`")

    def decode(self, latent: np.ndarray, num_frames: int, progress: Progress | None = None) -> np.ndarray:
        """Latent [1, 4, T_lat, h, w] -> video [3, num_frames, 8h, 8w] float32 in about [-1, 1]."""
        vae = self.model.vae
        per_chunk = vae.micro_z_frame_size
        decoder = self._loaded("vae_decoder")
        chunks, t_start = [], time.perf_counter()
        total = -(-latent.shape[2] // per_chunk)
        for k in range(total):
            video = decoder.run({"z": latent[:, :, k * per_chunk:(k + 1) * per_chunk]})["video"]
            frames = min(vae.micro_frame_size, num_frames - k * vae.micro_frame_size)
            front_padding = -frames % vae.temporal_downsample  # zero frames the causal VAE put in front
            chunks.append(video[0, :, front_padding:].astype(np.float32, copy=False))
            _check_finite(chunks[-1], f"the frames of VAE chunk {k + 1} of {total}")
            done = time.perf_counter() - t_start
            self._report(progress, "vae_decode", k + 1, total, done / (k + 1) * (total - k - 1))
        self._done_with("vae_decoder")
        self.timings["vae_decode_s"] = time.perf_counter() - t_start
        return np.concatenate(chunks, axis=1)

    def generate(self, prompt: str, negative_prompt: str | None = None, *, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, fps: float | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None, noise: np.ndarray | None = None,
                 progress: Progress | None = None, image: str | os.PathLike | np.ndarray | None = None,
                 condition: str = "head", video: str | os.PathLike | np.ndarray | None = None, extend: int = 0,
                 resolution: str | None = None, aspect_ratio: str | None = None, guidance_img: float | None = None,
                 t2i2v: bool | None = None, t2i_steps: int | None = None) -> np.ndarray:
        """One video: uint8 frames [F, H, W, 3] (H, W rounded down to multiples of 8).
        Unset arguments take the bundle's defaults; `noise` [1, 4, T_lat, H/8, W/8] replaces the first
        clip's seeded noise. References (osx.runtime.conditioning): `image` (a file or uint8 [H, W, 3] RGB)
        is the video's first ("head"), last ("tail") or first and last ("loop") frame; `video` (a file or
        uint8 [F, H, W, 3]) is continued: its last 17 frames are the clip's first 17. `extend` N appends N
        clips, each continuing the one before (its first 17 frames, which re-create the previous clip's
        last 17, are dropped): F = num_frames + N * (num_frames - 17). Per-stage and per-step seconds are
        left in `self.timings`. Open-Sora v2.0's options (`resolution` names, `aspect_ratio`, `guidance_img`,
        `t2i2v`, `t2i_steps`) are refused with an InputError saying why, as `osx generate` and the shim refuse them."""
        request = self.prepare_request(prompt, negative_prompt, num_frames=num_frames, height=height, width=width,
                                       fps=fps, steps=steps, guidance_scale=guidance_scale, seed=seed, resolution=resolution,
                                       aspect_ratio=aspect_ratio, guidance_img=guidance_img, t2i2v=t2i2v, t2i_steps=t2i_steps)
        return self.run(request, noise, progress, image=image, condition=condition, video=video, extend=extend)

    def check_references(self, request: Request, *, image: str | os.PathLike | np.ndarray | None = None,
                         condition: str = "head", video: str | os.PathLike | np.ndarray | None = None,
                         extend: int = 0) -> int:
        """Every check `run` makes of a request's reference and extension, with `run`'s messages, before any
        work: the reference is read and checked, nothing is encoded (a server checks an upload so at
        submission). Returns `extend` as an int."""
        extend = self._checked_extend(request, extend)
        if image is not None or video is not None:
            self.reference_condition(request, image, video, condition, encode=False)
        return extend

    def run(self, request: Request, noise: np.ndarray | None = None, progress: Progress | None = None, *,
            image: str | os.PathLike | np.ndarray | None = None, condition: str = "head",
            video: str | os.PathLike | np.ndarray | None = None, extend: int = 0) -> np.ndarray:
        """`generate` for a request from `prepare_request`."""
        if noise is not None and tuple(np.shape(noise)) != self.latent_shape(request):
            raise InputError(f"noise has shape {np.shape(noise)}, expected {self.latent_shape(request)}", hint="or pass a seed")
        extend = self._checked_extend(request, extend)
        self._cancel.clear()
        self.timings = {}
        self._t0 = time.perf_counter()
        self._clip, self._clips = 0, 1 + extend
        try:
            frames = self._run(request, noise, progress, image, condition, video, extend)
        finally:
            self._clip, self._clips = 0, 1
        self.timings["total_s"] = time.perf_counter() - self._t0
        return frames

    def _run(self, request, noise, progress, image, condition, video, extend) -> np.ndarray:
        cond = self.reference_condition(request, image, video, condition, progress)
        y, mask = self.encode_text(request, progress)
        pixels = self.decode(self.denoise(request, y, mask, noise, progress, cond), request.num_frames, progress)
        clips = [to_uint8_frames(pixels)]
        for k in range(1, 1 + extend):  # each clip continues the one before from its last chunk, as decoded (floats)
            self._clip, chunk = k, self.model.vae.micro_frame_size
            cond = Condition.head(self.encode_reference(pixels[:, -chunk:], progress), latent_frames(request.num_frames, self.model.vae))
            clip_noise = extension_noise(request.seed, k, self.latent_shape(request))
            pixels = self.decode(self.denoise(request, y, mask, clip_noise, progress, cond), request.num_frames, progress)
            clips.append(to_uint8_frames(pixels[:, chunk:]))  # its first chunk re-creates the previous clip's last
        return np.concatenate(clips) if extend else clips[0]

    def cancel(self) -> None:
        """Stop the running generation at the next step (thread-safe)."""
        self._cancel.set()

    def preload(self) -> None:
        """Load every component now and keep them, and the VAE encoder once a reference needs it, resident
        between requests (e.g. a server's replica; or before timing) until `release()`."""
        self.resident = True
        for name in self.components:
            self._loaded(name)

    def release(self) -> None:
        self.resident = False
        for backend in self.backends.values():
            backend.release()

    # --- helpers ---------------------------------------------------------------------------------
    def _loaded(self, component: str) -> Backend:
        """The component's backend, loaded (load time goes to timings["load_s"], not to the stage)."""
        backend = self.backends[component]
        if not backend.loaded:
            t0 = time.perf_counter()
            backend.load()
            self.timings.setdefault("load_s", {})[component] = time.perf_counter() - t0
        return backend

    def _done_with(self, component: str) -> None:
        if self.load_one_at_a_time:
            self.backends[component].release()

    def _report(self, progress: Progress | None, phase: str, step: int, total: int, eta: float) -> None:
        elapsed = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        event = {"phase": phase, "step": step, "total": total, "elapsed": elapsed, "eta": eta}
        if self._clips > 1:  # video extension: which clip of how many
            event.update(clip=self._clip + 1, clips=self._clips)
        if progress is not None and progress(event) is False:
            self._cancel.set()
        if self._cancel.is_set():
            raise GenerationCancelled(f"cancelled during {phase} after step {step} of {total}")


def _load_null_text(bundle: Bundle, denoiser) -> np.ndarray:
    rel = bundle.components["denoiser"].file_of("null_text_file")
    if not rel:
        raise BundleError(f"{bundle.root}: the denoiser has no null_text_file", hint="re-export the bundle with `osx export`")
    try:
        null = np.load(bundle.path(rel), allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle.root}: cannot read {rel}: {e}", hint="re-export the bundle") from None
    y = next(t for t in denoiser.inputs if t.name == "y")
    if null.ndim != 2 or tuple(null.shape) != tuple(y.shape[1:]):
        raise BundleError(f"{bundle.root}: null caption has shape {null.shape}, the denoiser takes {tuple(y.shape[1:])}")
    return null.astype(np.float32)


def _check_pixels(a, what: str, expected: str) -> None:
    """RGB uint8 pixels with the axes `expected` names ([H, W, 3] or [F, H, W, 3]), none of them empty."""
    ndim = expected.count(",") + 1
    if not (isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == ndim and a.shape[-1] == 3 and min(a.shape) >= 1):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise InputError(f"{what}: expected {expected}, got {got}")


def _check_finite(a: np.ndarray, what: str) -> None:
    """NaN or inf would become a garbage video written with exit 0: stop, naming the stage."""
    if np.count_nonzero(np.isfinite(a)) != a.size:  # not .all(): its reduction costs more, cold after a model call
        raise OsxError(f"{what} holds NaN or infinite values; no video was written",
                       hint="lower --guidance-scale or --steps towards the bundle's defaults; if that does not help, "
                       "the bundle's weights are broken (osx bundle verify, or re-export it)")


def shape_limits(model: ModelConfig, limits: dict[str, list[dict]], buckets=()) -> dict:
    """What a bundle generates: {"width": [lo, hi], "height": [lo, hi], "frames": [[first, last], ...]} in
    pixels of the output (a multiple of 8; a request in between is rounded down), or, for TensorRT engines
    built for static shapes, {"buckets": [{"height", "width", "frames"}]}. `limits`: the shape profiles
    the denoiser and the VAE decoder run ({component: [dims]}: an engine's, or the manifest's ONNX ranges),
    so `osx bundle info` shows the same as `generate`'s errors."""
    if buckets:
        return {"buckets": [{"height": h, "width": w, "frames": f} for h, w, f in buckets]}
    den, vae = _span(limits["denoiser"]), _span(limits["vae_decoder"])
    lh = _intersect(den["latent_height"], vae["latent_height"])
    lw = _intersect(den["latent_width"], vae["latent_width"])
    chunk = model.vae.micro_frame_size
    frames = [f for f in range(1, chunk * (den["latent_frames"].max + 1)) if _frames_ok(model, limits, f)]
    ds = model.vae.spatial_downsample
    return {"width": [ds * lw[0], ds * lw[1]], "height": [ds * lh[0], ds * lh[1]], "frames": _runs(frames)}


def describe_limits(lim: dict) -> str:
    if "buckets" in lim:
        return "the shapes its engines were built for: " + ", ".join(
            f"{b['width']}x{b['height']} (WxH) with {b['frames']} frames" for b in lim["buckets"])
    (w0, w1), (h0, h1) = lim["width"], lim["height"]
    runs = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in lim["frames"])
    return f"width {w0}..{w1} px, height {h0}..{h1} px (multiples of 8; other sizes are rounded down), frames {runs}"


def _frames_ok(model: ModelConfig, limits: dict[str, list[dict]], f: int) -> bool:
    # Open-Sora's timestep transform takes floor(F / 17) * 5 latent frames: 0 for 2..16 frames
    t = latent_frames(f, model.vae)
    return (f == 1 or f >= model.vae.micro_frame_size) and any(p["latent_frames"].contains(t) for p in limits["denoiser"])


# The runtime pipeline of each sampler kind a family declares (osx.families SamplerDecl.kind).
PIPELINES = {SAMPLER: "osx.runtime.pipeline:Pipeline", "rectified-flow-v2.0": "osx.runtime.pipeline_v2:PipelineV2"}


def pipeline_class(bundle: Bundle | Manifest) -> type[Pipeline]:
    """The Pipeline class that runs a bundle, by its family's sampler kind; a BundleError if none does."""
    manifest, where = (bundle.manifest, bundle.root) if isinstance(bundle, Bundle) else (bundle, "the bundle")
    manifest.model_config()  # a family this osx does not know: a BundleError saying so
    family = get_family(manifest.model["family"])
    if family.sampler.kind not in PIPELINES:
        raise BundleError(f"{where}: {family.name} samples with {family.sampler.kind!r}, which this osx runtime does not run",
                          hint=f"this runtime runs {', '.join(PIPELINES)}; use the osx version that wrote the bundle")
    return resolve(PIPELINES[family.sampler.kind])


def _limits(backend: Backend, spec) -> list[dict]:
    return backend.limits() if hasattr(backend, "limits") else [spec.dims]


def _buckets(backend: Backend) -> list[tuple[int, int, int]]:
    return backend.buckets() if hasattr(backend, "buckets") else []


def _span(profiles: list[dict]) -> dict[str, DimRange]:
    """One range per dimension covering every profile (for the message of what a bundle supports)."""
    return {d: DimRange(min(p[d].min for p in profiles), profiles[0][d].opt, max(p[d].max for p in profiles))
            for d in profiles[0]}


def _intersect(a, b) -> tuple[int, int]:
    return max(a.min, b.min), min(a.max, b.max)


def _runs(values: list[int]) -> list[list[int]]:
    """[1, 17, 18, 19] -> [[1, 1], [17, 19]]."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append([start, v])
            start = None
    return out
