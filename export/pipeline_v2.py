"""Open-Sora v2.0 in torch, text or image to video, as its `scripts/diffusion/inference.py` runs it.

prompt --suffixes--> T5 (512 tokens) + CLIP pooled, for [prompt, negative, negative]
reference image/video --resize-crop--> VAE encode --> conditioning mask + reference latents (i2v / v2v)
noise --3-pass guided Euler over the MMDiT (export/sampler_v2.py)--> conditioned frames overwritten (i2v)
--> VAE decode --> first F frames --> uint8 frames.

The oracle of export validation, calibration capture and the runtime's parity tests: every intermediate comes
back in `ReferenceV2Result`. `build_reference_v2` makes the model from seeded random weights or the released
checkpoint files, in bf16 (as Open-Sora runs all four parts) or float32.

Deviations from Open-Sora, on purpose: the initial noise is osx's (NumPy PCG64 from the seed, rounded to
bf16; Open-Sora draws from the CUDA generator, which nothing else reproduces; pass `noise` to inject its
tensor); references are encoded to the posterior mean unless `reference_seed` is given (Open-Sora samples the
posterior from the unseeded global generator); seed 0 is the seed 0 (Open-Sora's script treats 0 as "none").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tokenizers import Tokenizer

from osx.errors import CheckpointError, InputError, OsxError
from osx.export.checkpoint_v2 import load_part, resolve_parts
from osx.export.clip import CLIPTextEncoder, build_tiny_clip_tokenizer
from osx.export.flux_ae import FluxAEDecoder
from osx.export.hunyuan_vae import HunyuanVideoVAE
from osx.export.init import seeded_init_
from osx.export.mmdit import MMDiT
from osx.export.pipeline import reference_preprocess, reference_preprocess_video
from osx.export.sampler_v2 import DTYPES, condition, denoise, schedule
from osx.export.t5 import T5TextEncoder
from osx.export.tokenizer import build_tiny_tokenizer, convert_t5_sentencepiece
from osx.models_v2 import (
    COND_TYPES, OpenSoraV2Config, check_frames, get_model_config_v2, image_size, latent_shape, negative_prompt_v2,
    prepare_prompt_v2,
)
from osx.runtime.scheduler import initial_noise
from osx.runtime.tokenizer import TextTokenizer
from osx.runtime.video import to_uint8_frames
from osx.numeric import format_size

BF16 = torch.bfloat16
CLIP_PAD = "<|endoftext|>"


@dataclass
class ReferenceV2:
    cfg: OpenSoraV2Config
    t5: T5TextEncoder
    clip: CLIPTextEncoder
    mmdit: MMDiT
    vae: HunyuanVideoVAE
    t5_tokenizer: Tokenizer
    clip_tokenizer: Tokenizer

    @property
    def dtype(self) -> torch.dtype:
        return self.mmdit.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mmdit.img_in.weight.device


def build_reference_v2(
    cfg: OpenSoraV2Config | str,
    *,
    seed: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    parts: dict[str, str | os.PathLike] | None = None,
    dtype: torch.dtype = BF16,
    device: str | torch.device = "cpu",
) -> ReferenceV2:
    """`cfg`: a config or a model name (`opensora-v2.0`, `opensora-v2.0-tiny`).

    Random weights from `seed` (default: the config's `random_init_seed`; N(0, 1/sqrt(fan_in)) per tensor,
    see export/init.py) with the tiny deterministic tokenizers, or the released weights: a `checkpoint` folder
    and/or explicit `parts` {"mmdit", "vae", "t5", "clip": path}, each loaded strictly (exit 2 on any key
    mismatch), with the tokenizers of the T5 (spiece.model) and CLIP (tokenizer.json) folders. The modules
    end in `dtype` on `device`."""
    if seed is not None and (checkpoint is not None or parts):
        raise OsxError("give either a seed (random weights) or a checkpoint, not both")
    cfg = get_model_config_v2(cfg) if isinstance(cfg, str) else cfg
    if checkpoint is None and not parts:
        modules = build_modules(cfg)
        seed = cfg.random_init_seed if seed is None else seed
        for module in modules.values():
            seeded_init_(module, seed)
        paths = None
    else:
        paths = resolve_parts(checkpoint, **(parts or {}))
        # The large parts are built without memory and take the checkpoint's tensors, read one at a time and
        # cast to `dtype` (the weights once in memory); CLIP has a computed buffer (position ids) and stays
        # a normal module, as does the small VAE.
        modules = build_modules(cfg, meta=("mmdit", "t5"))
        for part, module in modules.items():
            load_part(module, paths[part], part, dtype=dtype)
    toks = tokenizers(cfg, paths)
    for module in modules.values():
        module.to(device, dtype).eval().requires_grad_(False)
    return ReferenceV2(cfg, modules["t5"], modules["clip"], modules["mmdit"], modules["vae"], toks["text_encoder"], toks["clip"])


# --- what the exporter builds from (the family declaration's `export_parts`) -----------------------------


VIDEO_PARTS = ("t5", "clip", "mmdit", "vae")  # the reference's; Flux.1-dev's two for t2i2v (`osx export --with-t2i`)


def part_factories(cfg: OpenSoraV2Config) -> dict[str, Callable[[], torch.nn.Module]]:
    """How to build each checkpoint part's torch module (float32, weights left to the caller): the four video
    parts, and where the model has a t2i2v image step, Flux.1-dev and its AE decoder. The MMDiT and Flux round
    their timestep embeddings as the config's reference dtype says."""
    dtype = cfg.sampler.reference_dtype
    parts = {"t5": lambda: T5TextEncoder(cfg.t5), "clip": lambda: CLIPTextEncoder(cfg.clip),
             "mmdit": lambda: MMDiT(cfg.mmdit, dtype), "vae": lambda: HunyuanVideoVAE(cfg.vae)}
    if cfg.t2i is not None:
        t2i = cfg.t2i
        parts.update(flux=lambda: MMDiT(t2i.mmdit, dtype), flux_ae=lambda: FluxAEDecoder(t2i.ae))
    return parts


def random_init_std(cfg: OpenSoraV2Config) -> dict[str, float | None]:
    """Random weights' std per part: None, each tensor's own 1/sqrt(fan_in) (osx.export.init)."""
    return dict.fromkeys(part_factories(cfg))


def tokenizers(cfg: OpenSoraV2Config, paths: dict[str, os.PathLike] | None) -> dict[str, Tokenizer]:
    """{text encoder component: tokenizer}: the tiny deterministic ones for random weights, else the T5
    folder's sentencepiece model (converted) and the CLIP folder's tokenizer.json."""
    if paths is None:
        return {"text_encoder": build_tiny_tokenizer(cfg.t5), "clip": build_tiny_clip_tokenizer(cfg.clip)}
    return {"text_encoder": convert_t5_sentencepiece(_required(paths["t5"], "spiece.model", "T5")),
            "clip": Tokenizer.from_file(str(_required(paths["clip"], "tokenizer.json", "CLIP")))}


def build_modules(cfg: OpenSoraV2Config, meta: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """The four video parts, float32; those named in `meta` on the meta device (shapes only, no memory)."""
    modules = {}
    for part, make in part_factories(cfg).items():
        if part not in VIDEO_PARTS:
            continue
        with torch.device("meta" if part in meta else "cpu"):
            modules[part] = make()
    return modules


def _required(folder: os.PathLike, name: str, what: str):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} folder {folder} has no {name}", hint=f"point at the released {what} folder (it ships {name})")
    return path


@dataclass
class ReferenceV2Result:
    prompt: str  # with Open-Sora's suffixes
    negative_prompt: str
    cond_type: str
    height: int
    width: int
    num_frames: int
    t5_ids: np.ndarray  # [3, 512] int64: prompt, negative, negative
    clip_ids: np.ndarray  # [3, 77]
    txt: np.ndarray  # [3, 512, 4096] T5 states (float32 copy of the model dtype)
    y_vec: np.ndarray  # [3, 768] CLIP pooled
    masks: np.ndarray  # [1, 1, T, h, w] conditioning mask
    masked_ref: np.ndarray  # [1, 16, T, h, w] reference latents where the mask is 1
    noise: np.ndarray  # [1, 16, T, h, w] float32 (bf16 values at reference dtype bf16)
    timesteps: list[float]  # steps + 1, from 1 to 0
    latents: list[np.ndarray]  # x after every step
    latent: np.ndarray  # what the VAE decodes (i2v: with the reference frame(s) written back)
    video: np.ndarray  # [1, 3, F, H, W] float32, about [-1, 1]
    frames: np.ndarray  # [F, H, W, 3] uint8
    seed: int | None


@torch.no_grad()
def reference_generate_v2(
    model: ReferenceV2,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    cond_type: str = "t2v",
    references: list | None = None,
    resolution: str | None = None,
    aspect_ratio: str | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    guidance_img: float | None = None,
    motion_score: str | None = None,
    seed: int | None = None,
    noise: np.ndarray | None = None,
    reference_seed: int | None = None,
    progress: bool = False,
) -> ReferenceV2Result:
    """One video. Sizes: `height`/`width` (rounded up to multiples of 16, as Open-Sora), else the
    `resolution` bucket and `aspect_ratio` (defaults: the config's). `references` for i2v/v2v: images or
    videos as uint8 arrays [H, W, 3] / [F, H, W, 3] or float tensors [3, F, H, W] in [-1, 1]; i2v_head uses
    the first frame of the first, i2v_tail the last frame of the last, i2v_loop both, v2v the first one's
    first/last 33 frames (65 for *_easy when it has them). `progress`: a bar over the denoising steps."""
    cfg = model.cfg
    sampler = cfg.sampler
    if cond_type not in COND_TYPES:
        raise InputError(f"unknown cond_type {cond_type!r}", hint=f"use one of {', '.join(COND_TYPES)}")
    if height is None or width is None:
        height, width = image_size(cfg, resolution or cfg.defaults.resolution, aspect_ratio or cfg.defaults.aspect_ratio)
    if min(height, width) < 16:
        raise InputError(f"{format_size(width, height)}: each side needs at least 16 pixels (one 2x2 patch of 8x latents)")
    height, width = -(-height // 16) * 16, -(-width // 16) * 16
    num_frames = cfg.defaults.num_frames if num_frames is None else num_frames
    check_frames(cfg, num_frames)
    steps = sampler.num_steps if num_steps is None else num_steps
    if not 1 <= steps <= 1000:
        raise InputError(f"num_steps={steps}: use 1 to 1000")
    shape = (1, *latent_shape(cfg, height, width, num_frames))

    text = prepare_prompt_v2(prompt, sampler.fps, sampler.motion_score if motion_score is None else motion_score)
    negative = negative_prompt_v2(negative_prompt)
    texts = [text, negative, negative]
    t5_ids, _ = TextTokenizer(model.t5_tokenizer, cfg.t5.max_length).encode(texts)
    clip_ids, _ = TextTokenizer(model.clip_tokenizer, cfg.clip.max_length, pad_token=CLIP_PAD).encode(texts)
    dev = model.device
    t5_ids, clip_ids = torch.from_numpy(t5_ids).to(dev), torch.from_numpy(clip_ids).to(dev)
    txt = model.t5(t5_ids, torch.ones_like(t5_ids))  # Open-Sora passes no attention mask: pads are attended
    y_vec = model.clip(clip_ids)

    refs = _encode_references(model, cond_type, references or [], height, width, reference_seed)
    masks, masked_ref = condition(cond_type, shape, refs)

    if noise is None:
        seed = cfg.defaults.seed if seed is None else seed
        noise = initial_noise(seed, shape)
    elif tuple(noise.shape) != shape:
        raise InputError(f"noise has shape {tuple(noise.shape)}, expected {shape}", hint="or pass a seed instead")
    z = torch.from_numpy(np.asarray(noise, dtype=np.float32)).to(dev, DTYPES[sampler.reference_dtype])

    x, latents = denoise(model.mmdit, z, txt, y_vec, masks=masks, masked_ref=masked_ref, cond_type=cond_type,
                         cfg=sampler, num_steps=steps, guidance=guidance, guidance_img=guidance_img,
                         return_intermediates=True, progress=progress)
    x = x.clone()
    # Open-Sora writes the reference frame(s) back into batch row 0, also for a one-frame image
    if cond_type in ("i2v_head", "i2v_loop"):
        x[0, :, :1] = refs[0][0, :, :1].to(x.dtype)
    if cond_type in ("i2v_tail", "i2v_loop"):
        x[0, :, -1:] = refs[-1][0, :, -1:].to(x.dtype)
    video = model.vae.decode(x.to(model.vae.post_quant_conv.weight.dtype))[:, :, :num_frames].float()

    f32 = lambda t: t.float().cpu().numpy()  # noqa: E731
    return ReferenceV2Result(
        prompt=text, negative_prompt=negative, cond_type=cond_type, height=height, width=width,
        num_frames=num_frames, t5_ids=t5_ids.cpu().numpy(), clip_ids=clip_ids.cpu().numpy(), txt=f32(txt), y_vec=f32(y_vec),
        masks=f32(masks), masked_ref=f32(masked_ref), noise=f32(z),
        timesteps=schedule(sampler, steps, shape[3] * shape[4] // cfg.mmdit.patch_size**2, shape[2]),
        latents=[f32(t) for t in latents], latent=f32(x), video=f32(video),
        frames=to_uint8_frames(f32(video[0])), seed=seed,
    )


def _encode_references(model: ReferenceV2, cond_type: str, references: list, height: int, width: int,
                       seed: int | None) -> list[torch.Tensor]:
    """The VAE latents of the reference frames `condition` needs (Open-Sora's collect_references_batch)."""
    if cond_type == "t2v":
        if references:
            raise InputError("t2v takes no reference", hint="pass cond_type i2v_head (or another) to use one")
        return []
    if not references:
        raise InputError(f"{cond_type} needs a reference image or video", hint="pass references=[image]")
    videos = [resize_crop(r, height, width) for r in references]  # each [3, F, H, W] in [-1, 1]
    if cond_type.startswith("v2v"):
        have = videos[0].shape[1]
        need = (64 if have >= 64 and cond_type.endswith("_easy") else 32) + 1  # Open-Sora's rule, + the causal frame
        if have < need:
            raise InputError(f"{cond_type} needs a reference video of at least {need} frames, got {have}")
        clips = [videos[0][:, :need] if "head" in cond_type else videos[0][:, -need:]]
    elif cond_type == "i2v_head":
        clips = [videos[0][:, :1]]
    elif cond_type == "i2v_tail":
        clips = [videos[-1][:, -1:]]
    else:  # i2v_loop
        clips = [videos[0][:, :1], videos[-1][:, -1:]]
    dtype = model.vae.post_quant_conv.weight.dtype  # Open-Sora encodes in the VAE's dtype (bf16)
    gen = None if seed is None else torch.Generator(model.device).manual_seed(seed)
    return [model.vae.encode(c[None].to(model.device, dtype), generator=gen).float() for c in clips]


def resize_crop(reference, height: int, width: int) -> torch.Tensor:
    """A reference as Open-Sora's `read_from_path(..., transform_name="resize_crop")` reads it -> [3, F, H, W] in
    [-1, 1]. An image [H, W, 3] uint8: PIL bicubic resize to cover height x width, centre crop at
    int(round(excess / 2)) (`resize_crop_to_fill`); a video [F, H, W, 3] uint8: the video transform, torch's
    bilinear interpolate and a crop at int(round(excess) / 2), i.e. the floor (`video_transforms`). A [3, F, H, W]
    tensor in [-1, 1] of the target size is taken as it is, another size goes as uint8 frames (F = 1: an image)."""
    if isinstance(reference, torch.Tensor):
        if reference.dim() != 4 or reference.shape[0] != 3:
            raise InputError(f"reference tensor of shape {list(reference.shape)}", hint="expected [3, F, H, W] in [-1, 1]")
        if tuple(reference.shape[-2:]) == (height, width):
            return reference.float()
        frames = ((reference.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
        reference = frames[0] if len(frames) == 1 else frames
    frames = np.asarray(reference)
    if frames.ndim not in (3, 4) or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"reference of shape {frames.shape} ({frames.dtype})", hint="expected uint8 [H, W, 3] or [F, H, W, 3]")
    if frames.ndim == 3:
        return reference_preprocess(frames, height, width)[:, None]
    return reference_preprocess_video(frames, height, width)
