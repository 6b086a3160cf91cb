"""Image conditioning for Open-Sora v1.2 bundles (image-to-video), torch-free.

Open-Sora's mask strategy (shared/design/open-sora-models.md, section 1.5), for one sample:
  * reference latents are copied into the initial noise at their latent frames, and the per-frame mask
    is set there to the edit ratio (0 = keep the reference exactly; 1 elsewhere);
  * each step, x0 = z; a frame is "generating" when mask * num_timesteps >= t; frames that just started
    generating get fresh noise at level t (only with an edit ratio in (0, 1)); the denoiser gets the
    generating flags as `x_mask` (other frames are modulated as timestep 0);
  * after the step, frames not generating are reset to x0, so the reference stays clean.

Reference images: resized to fill the target (bicubic, as PIL resamples: antialiased when shrinking)
and centre-cropped, as Open-Sora's `resize_crop_to_fill`, then scaled to [-1, 1]. Reference videos go
through Open-Sora's video transform instead: bilinear as torch's `interpolate` (no antialiasing) on
[0, 1] floats, its own crop offset. The VAE encoder exported into the bundle returns the posterior MEAN
(no sampling, so no random generator is involved).

Continuing a video (`Condition.head`): the last VAE chunk of the reference (17 pixel frames, 5 latent
frames) is encoded and held at the first latent frames of the new clip, edit ratio 0, as Open-Sora's
loop (`append_generated`: ref_start -condition_frame_length, target 0). Open-Sora encodes the whole video
in 17-frame chunks from its start and, with align=5, takes the last complete chunk; for videos whose
length is a multiple of 17 (all it makes) that is the same chunk. For other lengths osx takes the last 17
frames, so the continuation starts where the video ends (Open-Sora would restart up to 16 frames early).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from osx.errors import BundleError, InputError

CONDITIONS = ("head", "tail", "loop")  # where the reference image goes: first, last, or both latent frames


@dataclass(frozen=True)
class Condition:
    latent: np.ndarray  # [1, C, T_lat, h, w] reference latents at the conditioned frames (zeros elsewhere)
    mask: np.ndarray  # [T_lat] float32: 1 = generate; the edit ratio at conditioned frames (0 = keep)

    @classmethod
    def image(cls, ref: np.ndarray, latent_frames: int, where: str = "head", edit_ratio: float = 0.0) -> "Condition":
        """One reference latent [1, C, 1, h, w] at the first ("head"), last ("tail") or both ("loop") frames."""
        if where not in CONDITIONS:
            raise InputError(f"condition {where!r} is not one of {', '.join(CONDITIONS)}")
        frames = {"head": [0], "tail": [latent_frames - 1], "loop": sorted({0, latent_frames - 1})}[where]
        latent = np.zeros((*ref.shape[:2], latent_frames, *ref.shape[3:]), np.float32)
        mask = np.ones(latent_frames, np.float32)
        for f in frames:
            latent[:, :, f] = ref[:, :, 0]
            mask[f] = edit_ratio
        return cls(latent, mask)

    @classmethod
    def head(cls, ref: np.ndarray, latent_frames: int) -> "Condition":
        """Reference latents [1, C, k, h, w] held at the first k latent frames (a video continued)."""
        k = ref.shape[2]
        if k >= latent_frames:
            raise InputError(f"continuing a video holds the first {k} latent frames fixed, and this clip has {latent_frames}",
                             hint="ask for more frames: a multiple of 17 above 17 (34, 51, ...) fills whole VAE chunks")
        latent = np.zeros((*ref.shape[:2], latent_frames, *ref.shape[3:]), np.float32)
        latent[:, :, :k] = ref
        mask = np.ones(latent_frames, np.float32)
        mask[:k] = 0.0
        return cls(latent, mask)


def extension_noise(seed: int, clip: int, shape: tuple[int, ...]) -> np.ndarray:
    """The initial noise of extension clip `clip` (1, 2, ...) of a request seeded `seed`: its own stream,
    apart from the first clip's (osx.runtime.scheduler.initial_noise) and the mask schedule's."""
    return np.random.default_rng([seed, 2, clip]).standard_normal(shape, dtype=np.float32)


class MaskSchedule:
    """The per-step mask rule over one sample's latent z [1, C, T, h, w]; a no-op without a condition."""

    def __init__(self, condition: Condition | None, seed: int, has_x_mask: bool):
        if condition is not None and not has_x_mask:
            raise BundleError("this bundle's denoiser has no x_mask input, so it cannot condition on an image",
                              hint="re-export the bundle with this osx version (`osx export ... --with-vae-encoder`)")
        self.condition = condition
        self.rng = np.random.default_rng([seed, 1])  # fresh noise for partial edit ratios, seeded by the request
        self.x0 = self.upper = None
        self.noised = None if condition is None else condition.mask == 1

    def start(self, z: np.ndarray) -> np.ndarray:
        if self.condition is None:
            return z
        keep = (self.condition.mask < 1)[None, None, :, None, None]
        return np.where(keep, self.condition.latent, z).astype(np.float32)

    def before_step(self, z: np.ndarray, t: float, num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (z to denoise, x_mask [1, T] float32)."""
        if self.condition is None:
            return z, np.ones((1, z.shape[2]), np.float32)
        self.x0 = z.copy()
        self.upper = self.condition.mask * num_timesteps >= t
        fresh = self.upper & ~self.noised
        if fresh.any():
            u = np.float32(t / num_timesteps)
            noisy = (1 - u) * self.x0 + u * self.rng.standard_normal(z.shape, dtype=np.float32)
            z = np.where(fresh[None, None, :, None, None], noisy, self.x0)
        self.noised = self.upper
        return z, self.upper.astype(np.float32)[None]

    def after_step(self, z: np.ndarray) -> np.ndarray:
        if self.condition is None:
            return z
        return np.where(self.upper[None, None, :, None, None], z, self.x0)


# --- reference images -------------------------------------------------------------------------------


def load_image(path) -> np.ndarray:
    """RGB uint8 [H, W, 3] from an image file; a missing, broken or non-image file is an InputError."""
    import cv2

    data = np.fromfile(str(path), np.uint8) if os.path.isfile(path) else None
    if data is None:
        raise InputError(f"reference image {str(path)!r} does not exist or is not a file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InputError(f"reference image {str(path)!r} is not a readable image",
                         hint="pass a PNG, JPEG, WebP or BMP file (a video continues with --video)")
    return np.ascontiguousarray(image[:, :, ::-1])


def preprocess(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, 1, height, width] in [-1, 1]: resize to fill (bicubic), centre crop."""
    h, w = image.shape[:2]
    rh, rw = height / h, width / w
    if rh > rw:
        sh, sw = height, round(w * rh)
        top, left = 0, int(round((sw - width) / 2.0))
    else:
        sh, sw = round(h * rw), width
        top, left = int(round((sh - height) / 2.0)), 0
    resized = _resize_bicubic(image, sh, sw)[top:top + height, left:left + width]
    return _to_unit(resized)


def _to_unit(pixels: np.ndarray) -> np.ndarray:
    return ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[:, None]


def preprocess_video(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [3, F, height, width] in [-1, 1]: Open-Sora's video transform
    (`video_transforms.resize_crop_to_fill`): bilinear resize to fill as torch's interpolate
    (align_corners=False, no antialiasing) on [0, 1] floats, crop offset int(round(excess) / 2)."""
    h, w = frames.shape[1:3]
    rh, rw = height / h, width / w
    if rh > rw:
        sh, sw = height, round(w * rh)
        top, left = 0, int(round(sw - width) / 2.0)
    else:
        sh, sw = round(h * rw), width
        top, left = int(round(sh - height) / 2.0), 0
    f32 = np.float32
    x = frames.astype(f32) / f32(255.0)  # float32 like torch, so a crop without resizing is exact
    if sh != h:
        x = _apply(_bilinear_weights(h, sh), x, axis=1).astype(f32)
    if sw != w:
        x = _apply(_bilinear_weights(w, sw), x, axis=2).astype(f32)
    x = x[:, top:top + height, left:left + width]
    return ((x - f32(0.5)) / f32(0.5)).transpose(3, 0, 1, 2)


def _resize_bicubic(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PIL's BICUBIC resize (a = -0.5, kernel widened by the scale when shrinking): width first, then
    height, each pass rounded to uint8 as PIL does."""
    out = image
    if out_w != image.shape[1]:
        out = _to_uint8(_apply(_bicubic_weights(image.shape[1], out_w), out, axis=1))
    if out_h != image.shape[0]:
        out = _to_uint8(_apply(_bicubic_weights(image.shape[0], out_h), out, axis=0))
    return out


def _apply(weights: np.ndarray, a: np.ndarray, axis: int) -> np.ndarray:
    """Resample `a` along `axis` with weights [out, in] (float64)."""
    moved = np.moveaxis(a.astype(np.float64, copy=False), axis, 0)
    return np.moveaxis(np.tensordot(weights, moved, axes=(1, 0)), 0, axis)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        x = (np.arange(lo, hi) - center + 0.5) / filterscale
        k = _cubic(x)
        weights[i, lo:hi] = k / k.sum() if k.sum() else k
    return weights


def _bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """torch's upsample_bilinear2d along one axis: source (i + 0.5) * in/out - 0.5, clamped at 0, computed
    in float32 as torch does (its rounding of in/out moves the source by up to 1e-5 pixels)."""
    f32 = np.float32
    src = np.maximum((np.arange(out_size, dtype=f32) + f32(0.5)) * (f32(in_size) / f32(out_size)) - f32(0.5), f32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), i0), 1 - frac)
    np.add.at(weights, (np.arange(out_size), i1), frac)
    return weights


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))
