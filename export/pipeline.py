"""Text to video with the torch reference model, exactly as Open-Sora v1.2's `scripts/inference.py`.

prompt --prepare_prompt (aesthetic suffix, clean_caption x2)--> tokenizer (pad/truncate to L) --> T5
--> RFLOW sampler over STDiT3 with classifier-free guidance --> VAE decode --> uint8 frames.

Every intermediate comes back in `ReferenceResult` (as NumPy arrays), so the runtime, the exported
graphs and the quantized engines can be compared stage by stage against this oracle.

Unconditional half (classifier-free guidance), as in Open-Sora's RFLOW.sample:
  * default: STDiT3's learned null caption `y_embedding` (`denoiser.null_text`);
  * with `negative_prompt`: the T5 embedding of the negative prompt (its own tokens and attention mask
    inside T5). The negative prompt is cleaned like the prompt but gets no aesthetic-score suffix.
  In both cases the denoiser's cross-attention mask of the unconditional rows is the *conditional*
  prompt's mask, because Open-Sora repeats the one mask over both halves. So the uncond rows see
  exactly as many text tokens as the prompt has: the first L_cond rows of the null caption, or the
  negative prompt's embedding cut (or padded with its T5 outputs at pad positions) to L_cond tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from osx.errors import InputError
from osx.export.reference import ReferenceModel
from osx.export.sampler import sample, timesteps
from osx.models import IMAGE_FPS, latent_frames, latent_size
from osx.numeric import format_size
from osx.runtime.prompt import prepare_prompt
from osx.runtime.conditioning import extension_noise
from osx.runtime.scheduler import initial_noise
from osx.runtime.tokenizer import TextTokenizer
from osx.runtime.video import to_uint8_frames



@dataclass
class ReferenceResult:
    prompt: str  # prepared: suffix added and cleaned, what the tokenizer saw
    negative_prompt: str | None  # prepared the same way (no suffix), or None for the null caption
    input_ids: np.ndarray  # [1, L] int64
    attention_mask: np.ndarray  # [1, L] int64; also the denoiser's key mask for both halves
    text_embeds: np.ndarray  # [1, L, d_model] T5 output of the prompt
    y_null: np.ndarray  # [1, L, caption_channels] the unconditional text: null caption or negative prompt
    noise: np.ndarray  # [1, 4, T_lat, H/8, W/8] initial latent
    timesteps: np.ndarray  # [steps] float32 t'_i in [0, 1000], after the resolution-dependent transform
    latents: list[np.ndarray]  # the latent after each step
    latent: np.ndarray  # the final latent (== latents[-1])
    video: np.ndarray  # [1, 3, F, 8*(H//8), 8*(W//8)] float32 VAE output, about [-1, 1]
    frames: np.ndarray  # [F, 8*(H//8), 8*(W//8), 3] uint8
    fps: float  # the denoiser's fps conditioning
    guidance_scale: float
    steps: int
    seed: int | None
    clip_latents: list[np.ndarray] = field(default_factory=list)  # each clip's final latent (extension: 1 + extend)


@torch.no_grad()
def reference_generate(
    model: ReferenceModel,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    fps: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    noise: np.ndarray | None = None,
    image: np.ndarray | None = None,
    condition: str = "head",
    video: np.ndarray | None = None,
    extend: int = 0,
) -> ReferenceResult:
    """One video for one prompt. Unset arguments take the model config's defaults (sizes, steps,
    guidance scale, fps: 24, or 120 for one frame). `noise` (shape [1, 4, T_lat, H/8, W/8]) replaces
    `initial_noise(seed, shape)`; `seed` defaults to the config's default seed.
    `image` (uint8 [H, W, 3]) conditions the video at the `condition` frames ("head", "tail", "loop"):
    Open-Sora's resize_crop_to_fill with PIL, the VAE encoder's posterior mean, the mask strategy.
    `video` (uint8 [F, H, W, 3]) is continued, and `extend` N loops N more clips, as Open-Sora's inference
    loop: the reference (the video through Open-Sora's video transform, or the previous clip as decoded)
    is VAE-encoded whole, in 17-frame chunks from its start, and its last 5 latent frames are held at the
    clip's first 5 (`append_generated`: ref_start -5, target 0, edit ratio 0); each later clip drops its
    first 17 frames when joined. Open-Sora aligns ref_start to 5 latent frames, which is the last chunk
    for the multiple-of-17 lengths used here. Clip k > 0 starts from `extension_noise(seed, k, shape)`."""
    cfg = model.model_cfg
    num_frames = cfg.defaults.num_frames if num_frames is None else num_frames
    height = cfg.defaults.height if height is None else height
    width = cfg.defaults.width if width is None else width
    fps = (IMAGE_FPS if num_frames == 1 else cfg.scheduler.fps) if fps is None else fps
    steps = cfg.scheduler.num_sampling_steps if steps is None else steps
    guidance_scale = cfg.scheduler.guidance_scale if guidance_scale is None else guidance_scale
    _check_request(cfg, num_frames, height, width, steps)

    shape = (1, cfg.vae.temporal.latent_embed_dim, latent_frames(num_frames, cfg.vae), *latent_size(height, width, cfg.vae))
    seed = cfg.defaults.seed if seed is None else seed
    if noise is None:
        noise = initial_noise(seed, shape)
    elif tuple(noise.shape) != shape:
        raise InputError(f"noise has shape {tuple(noise.shape)}, expected {shape}", hint="or pass a seed instead")

    tokenizer = TextTokenizer(model.tokenizer, cfg.text_encoder.max_length)
    prepared = prepare_prompt(prompt, cfg.scheduler.aesthetic_score)
    input_ids, attention_mask = tokenizer.encode([prepared])
    text_embeds = _encode_text(model, input_ids, attention_mask)
    if negative_prompt is None:
        prepared_negative = None
        y_null = model.denoiser.null_text(1)
    else:
        prepared_negative = prepare_prompt(negative_prompt, aesthetic_score=None)
        y_null = _encode_text(model, *tokenizer.encode([prepared_negative]))

    cond = {}
    if image is not None:
        cond = _image_condition(model, image, condition, height, width, shape[2])
    elif video is not None:
        cond = _head_condition(model.vae.encode(reference_preprocess_video(video, height, width)[None]), cfg.vae, shape[2])
    videos, clip_latents = [], []
    for clip in range(1 + extend):
        clip_noise = noise if clip == 0 else extension_noise(seed, clip, shape)
        latent, latents = sample(
            model.denoiser,
            torch.from_numpy(np.asarray(clip_noise, dtype=np.float32)),
            text_embeds,
            torch.from_numpy(attention_mask),
            y_null,
            height=height,
            width=width,
            num_frames=num_frames,
            fps=fps,
            steps=steps,
            guidance_scale=guidance_scale,
            sched=cfg.scheduler,
            return_intermediates=True,
            **cond,
        )
        decoded = model.vae.decode(latent, num_frames)
        videos.append(decoded if clip == 0 else decoded[:, :, cfg.vae.micro_frame_size:])
        clip_latents.append(latent.numpy())
        if clip < extend:
            cond = _head_condition(model.vae.encode(decoded), cfg.vae, shape[2])
    joined = torch.cat(videos, dim=2)
    return ReferenceResult(
        prompt=prepared,
        negative_prompt=prepared_negative,
        input_ids=input_ids,
        attention_mask=attention_mask,
        text_embeds=text_embeds.numpy(),
        y_null=y_null.numpy(),
        noise=np.asarray(noise, dtype=np.float32),
        timesteps=timesteps(cfg.scheduler, steps, height, width, num_frames).numpy(),
        latents=[z.numpy() for z in latents],  # the last clip's
        latent=latent.numpy(),
        video=joined.numpy(),
        frames=to_uint8_frames(joined[0].numpy()),
        fps=fps,
        guidance_scale=guidance_scale,
        steps=steps,
        seed=seed,
        clip_latents=clip_latents,
    )


def reference_preprocess(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Open-Sora's `resize_crop_to_fill` (PIL bicubic resize to cover, centre crop), then ToTensor and
    Normalize(0.5, 0.5): [3, 1, height, width] in [-1, 1]."""
    from PIL import Image

    pil = Image.fromarray(image)
    w, h = pil.size
    rh, rw = height / h, width / w
    if rh > rw:
        sh, sw = height, round(w * rh)
        i, j = 0, int(round((sw - width) / 2.0))
    else:
        sh, sw = round(h * rw), width
        i, j = int(round((sh - height) / 2.0)), 0
    arr = np.array(pil.resize((sw, sh), Image.BICUBIC))[i:i + height, j:j + width]
    return (torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def reference_preprocess_video(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Open-Sora's video transform "resize_crop" (ToTensorVideo, `resize_crop_to_fill` with torch's bilinear
    interpolate, Normalize(0.5, 0.5)): uint8 [F, H, W, 3] -> [3, F, height, width] in [-1, 1]."""
    clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    h, w = clip.shape[-2:]
    rh, rw = height / h, width / w
    if rh > rw:
        sh, sw = height, round(w * rh)
        i, j = 0, int(round(sw - width) / 2.0)
    else:
        sh, sw = round(h * rw), width
        i, j = int(round(sh - height) / 2.0), 0
    clip = torch.nn.functional.interpolate(clip, size=(sh, sw), mode="bilinear", align_corners=False)
    return ((clip[..., i:i + height, j:j + width] - 0.5) / 0.5).permute(1, 0, 2, 3)


def _head_condition(ref: torch.Tensor, vae, t_lat: int) -> dict:
    """The last condition_frame_length (= 5) latent frames of `ref` held at the clip's first ones."""
    k = min(vae.micro_z_frame_size, ref.shape[2])
    cond_latent = torch.zeros(1, ref.shape[1], t_lat, *ref.shape[3:])
    cond_latent[:, :, :k] = ref[:, :, -k:]
    cond_mask = torch.ones(1, t_lat)
    cond_mask[:, :k] = 0.0
    return {"cond_latent": cond_latent, "cond_mask": cond_mask}


def _image_condition(model: ReferenceModel, image, condition: str, height: int, width: int, t_lat: int) -> dict:
    pixels = reference_preprocess(image, height, width)[None, :, None]  # [1, 3, 1, H, W]
    ref = model.vae.encode_chunk(pixels)  # posterior mean, model-normalised, [1, 4, 1, h, w]
    frames = {"head": [0], "tail": [t_lat - 1], "loop": sorted({0, t_lat - 1})}[condition]
    cond_latent = torch.zeros(1, ref.shape[1], t_lat, *ref.shape[3:])
    cond_mask = torch.ones(1, t_lat)
    for f in frames:
        cond_latent[:, :, f] = ref[:, :, 0]
        cond_mask[:, f] = 0.0
    return {"cond_latent": cond_latent, "cond_mask": cond_mask}


def _encode_text(model: ReferenceModel, input_ids: np.ndarray, attention_mask: np.ndarray) -> torch.Tensor:
    return model.text_encoder(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))


def _check_request(cfg, num_frames: int, height: int, width: int, steps: int) -> None:
    if num_frames < 1:
        raise InputError(f"num_frames={num_frames}: need at least 1 frame")
    if min(height, width) < cfg.min_side:
        raise InputError(f"{format_size(width, height)}: each side needs at least {cfg.min_side} pixels")
    if steps < 1:
        raise InputError(f"steps={steps}: need at least 1 sampling step")
