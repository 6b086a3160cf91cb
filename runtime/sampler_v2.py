"""Open-Sora v2.0 sampler in NumPy (`opensora/utils/sampling.py`: get_schedule, I2VDenoiser), torch-free.

A small flow-match Euler scheduler in the manner of diffusers', with Open-Sora's rules; export/sampler_v2.py
(the torch reference) takes its schedule, guidance scales and conditioning from here, so the two share one
implementation of everything that is not model arithmetic. Formulas: shared/design/opensora-v2.0.md, 5.

* Schedule: t = linspace(1, 0, steps+1) (float32, torch's scalar rule), shifted to alpha*t / (1 + (alpha-1)*t).
* Each step runs the denoiser on three rows, (prompt, reference), (negative, reference), (negative, none),
  giving c, u, u2; pred = u2 + g_img*(u - u2) + g_txt*(c - u); x += (t_next - t)*pred.
* bf16 exactly where the reference is bf16: x, the denoiser output, the timestep fed, the conditioning, the
  i2v ramp, and every operation of the combination and the update, each a float32 operation rounded to
  bfloat16 (`round_bf16`), as torch computes bf16 tensor arithmetic; Python-float scales become float32.
  `cfg.reference_dtype == "fp32"`: no rounding anywhere (osx.runtime.scheduler.to_reference), as the torch
  reference then runs the loop in float32.
* Noise: osx's one generator, `osx.runtime.scheduler.initial_noise(seed, shape)` (NumPy PCG64), rounded to
  bf16 here and in the reference alike (Open-Sora's CUDA Philox stream cannot be reproduced).

Shortcuts. Exact, on by default: when the conditioning is all zeros (t2v, or a one-frame image) the second
and third rows are the same input, so u2 is u and the third pass is not run; the combination is computed
unchanged with u2 = u (tests/test_runtime_sampler_v2.py: whole runs equal the reference's three passes).
Approximate, opt-in (`skip_unit_scale_passes`): on steps whose text scale is 1 (and image scale 1, or no
conditioning) pred = c in real arithmetic, so only the conditional pass runs; in bf16 `u + (c - u)` is not
always c, so the result drifts by a few bf16 roundings (measured in the test) and it is off by default.
Per step the loop does only the step's own arithmetic (#15: < 1 % of a step outside the denoiser, `bench.py
runtime --family opensora-v2.0`): timesteps, batches and ramps are made before the first step, the latent stays
packed until the end, and `_Step` works in place and skips the operations whose result is known, bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np

from osx.errors import InputError
from osx.numeric import round_bf16_bits, round_bf16_into
from osx.models_v2 import COND_TYPES, SamplerV2Config
from osx.runtime.scheduler import to_reference

F32 = np.float32
_ZERO = F32(0)
# denoiser(img [R, N, C*p*p], txt [R, L, D], timesteps [R], y_vec [R, V], cond [R, N, 4 + C*p*p]) -> velocity
Denoiser = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --- schedule and guidance scales -------------------------------------------------------------------------


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n) in float32 by its kernel's scalar rule: start + i*step in the first half,
    end - (n-1-i)*step in the second, step = (end - start)/(n - 1). (torch's SIMD path may round a few
    entries one float32 step apart depending on the CPU's vector width; osx uses this rule on both sides.)"""
    start, end = F32(start), F32(end)
    if n == 1:
        return np.array([start], dtype=F32)
    step = (end - start) / F32(n - 1)
    half = n // 2
    return np.array([start + step * F32(i) if i < half else end - step * F32(n - 1 - i) for i in range(n)], dtype=F32)


def shift_alpha(cfg: SamplerV2Config, tokens_per_frame: int, latent_frames: int) -> float:
    """alpha: linear in the tokens per latent frame through (256, 1) and (4096, 3), times sqrt(T_lat)."""
    if cfg.flow_shift is not None:
        return float(cfg.flow_shift)
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq - cfg.base_seq)
    return (slope * tokens_per_frame + cfg.base_shift - slope * cfg.base_seq) * math.sqrt(latent_frames)


def schedule(cfg: SamplerV2Config, num_steps: int, tokens_per_frame: int, latent_frames: int) -> list[float]:
    """The steps+1 timesteps 1 = t'_0 > ... > t'_steps = 0 (float32 values as Python floats); the shift in
    float32 with alpha and alpha - 1 rounded to float32, as torch does with Python scalars (no exp, no clamp)."""
    t = linspace_f32(1.0, 0.0, num_steps + 1)
    if cfg.shift:
        alpha = shift_alpha(cfg, tokens_per_frame, latent_frames)
        t = (F32(alpha) * t) / (F32(1) + F32(alpha - 1) * t)
    return [float(v) for v in t]


def oscillation(scale: float, step: int, start: int) -> float:
    """Open-Sora's get_oscillation_gs: `scale` before `start` and on even steps, 1.0 on odd steps after."""
    return scale if step < start or step % 2 == 0 else 1.0


def image_scale(cfg: SamplerV2Config, g_img: float, step: int, num_steps: int, latent_frames: int, cond_type: str):
    """The image guidance scale of one step: a float, or for i2v (when g_img > 1) the ramp over the latent
    frames as a [T_lat] float32 array: from 1 at frame 0 to upper_i at the last, upper_i falling linearly
    from g_img to 1 over the steps."""
    if not (g_img > 1.0 and cfg.scale_temporal_osci and "i2v" in cond_type):
        return g_img
    upper = linspace_f32(g_img, 1.0, num_steps + 1)[step]
    return linspace_f32(1.0, float(upper), latent_frames)


def guidance_scales(cfg: SamplerV2Config, step: int, num_steps: int, latent_frames: int, cond_type: str,
                    guidance: float, guidance_img: float):
    """(text scale, image scale or ramp) of one step, after oscillation."""
    g_txt = oscillation(guidance, step, cfg.osci_start) if cfg.text_osci else guidance
    g_img = oscillation(guidance_img, step, cfg.osci_start) if cfg.image_osci else guidance_img
    return g_txt, image_scale(cfg, g_img, step, num_steps, latent_frames, cond_type)


# --- conditioning --------------------------------------------------------------------------------------


def condition(cond_type: str, shape: tuple[int, ...], refs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """masks [B, 1, T, h, w] and masked_ref [B, C, T, h, w] (float32) of `prepare_inference_condition`.

    `refs`: the VAE-encoded references [B, C, T_ref, h, w]: none for t2v; the image for i2v_head/i2v_tail;
    the head and the tail image for i2v_loop; the video (at least k latent frames) for v2v. Conditioning
    needs more than one latent frame, as in Open-Sora (an image is never conditioned).
    """
    if cond_type not in COND_TYPES:
        raise InputError(f"unknown cond_type {cond_type!r}", hint=f"use one of {', '.join(COND_TYPES)}")
    B, C, T, h, w = shape
    masks = np.zeros((B, 1, T, h, w), dtype=F32)
    masked = np.zeros((B, C, T, h, w), dtype=F32)
    wanted = {"t2v": 0, "i2v_loop": 2}.get(cond_type, 1)
    if len(refs) != wanted:
        raise InputError(f"{cond_type} takes {wanted} reference(s), got {len(refs)}")
    if cond_type == "t2v" or T == 1:
        return masks, masked
    refs = [np.asarray(r, dtype=F32) for r in refs]
    if cond_type.startswith("v2v"):
        k = (16 if cond_type.endswith("_easy") else 8) + 1  # 32 or 64 pixel frames + the causal first
        ref = refs[0]
        if k > T:
            raise InputError(f"{cond_type} conditions {k} latent frames; the video has {T}",
                             hint=f"generate at least {4 * (k - 1) + 1} frames")
        if ref.shape[2] < k:
            raise InputError(f"{cond_type} needs a reference of at least {k} latent frames ({4 * (k - 1) + 1} video frames)")
        frames = slice(0, k) if "head" in cond_type else slice(T - k, T)
        masks[:, :, frames] = 1
        masked[:, :, frames] = ref[:, :, :k] if "head" in cond_type else ref[:, :, -k:]
        return masks, masked
    if cond_type in ("i2v_head", "i2v_loop"):
        masks[:, :, 0] = 1
        masked[:, :, 0] = refs[0][:, :, 0]
    if cond_type in ("i2v_tail", "i2v_loop"):
        masks[:, :, -1] = 1
        masked[:, :, -1] = refs[-1][:, :, -1]
    return masks, masked


def pack(x: np.ndarray, patch: int = 2) -> np.ndarray:
    """[B, C, T, H, W] -> [B, T*(H/p)*(W/p), C*p*p]: tokens in (t, h, w) order, channels (c, ph, pw)."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // patch, patch, W // patch, patch)
    return x.transpose(0, 2, 3, 5, 1, 4, 6).reshape(B, T * (H // patch) * (W // patch), C * patch * patch)


def unpack(x: np.ndarray, T: int, h: int, w: int, patch: int = 2) -> np.ndarray:
    """Inverse of `pack`: [B, T*h*w, C*p*p] -> [B, C, T, h*p, w*p] (h, w in patches)."""
    x = x.reshape(x.shape[0], T, h, w, -1, patch, patch)
    return x.transpose(0, 4, 1, 2, 5, 3, 6).reshape(x.shape[0], -1, T, h * patch, w * patch)


# --- the loop --------------------------------------------------------------------------------------------


def guided_velocity(c: np.ndarray, u: np.ndarray, u2: np.ndarray, g_txt: float, g_img,
                    reference_dtype: str = "bf16") -> np.ndarray:
    """u2 + g_img*(u - u2) + g_txt*(c - u), each operation in the reference dtype as torch evaluates it left to right
    (c, u, u2 hold values of that dtype). `u2 is u`: its pass was not run (`_Step.velocity`'s shortcut)."""
    rows = np.concatenate([c, u] if u2 is u else [c, u, u2])
    passes = ("c", "u") if u2 is u else ("c", "u", "u2")
    g_img = F32(g_img) if np.isscalar(g_img) else g_img
    return _Step(rows.shape, reference_dtype).velocity(rows, c.shape[0], passes, F32(g_txt), g_img, rounded=True).copy()


class _Step:
    """The loop's arithmetic after each denoiser call, in place: in the denoiser's output rows, the latent and
    one scratch buffer allocated per run. Each operation of the reference's bf16 (or fp32) tensor arithmetic is
    one NumPy pass with `out=`, each bf16 rounding five integer passes in place. Why: the first NumPy work after
    a denoiser call finds its output, the latent and NumPy's own code evicted by the call, so the post-model
    cost grows with the memory, the kinds of operation (reductions cost most) and the Python it touches
    (#15: < 1 % of a step outside the denoiser, `bench.py runtime --family opensora-v2.0`).

    NaN: the rounding's carry would turn a NaN with some payloads into inf or a number (osx.numeric.round_bf16
    puts NaNs back, at the price of a reduction). Arithmetic on non-NaN operands makes only the CPU's default
    NaN, which the carry leaves NaN; so NaNs are put back only once one has come from outside: the denoiser's
    output (looked for each step, one pass, unless the caller checks it: `finite_outputs`) or the starting
    latent (`nan_seen`, set by the loop)."""

    def __init__(self, rows_shape: tuple[int, ...], reference_dtype: str):
        self.bf16 = reference_dtype == "bf16"
        self.scratch = np.empty(rows_shape, np.uint32)
        self.is_nan = np.empty(rows_shape, bool)
        self.nan_seen = False
        self.finite_outputs = False  # the caller checks the denoiser's outputs: none holds a NaN

    def round_(self, a: np.ndarray) -> np.ndarray:
        """a's values rounded to the reference dtype, in place (a: [k, ...] rows like the scratch's)."""
        if self.bf16:
            if self.nan_seen:
                round_bf16_into(a, a, self.scratch[: len(a)])
            else:
                bits = a.view(np.uint32)
                round_bf16_bits(bits, self.scratch[: len(a)], bits)
        return a

    def velocity(self, v: np.ndarray, B: int, passes: tuple[str, ...], g_txt: np.float32, g_img, rounded: bool = False):
        """The guided velocity of the denoiser's rows v = [c], [c; u] or [c; u; u2] (B rows each), rounded to the
        reference dtype first (unless `rounded`), in v's memory; returns its view. Skipped, bit for bit
        (tests/test_sampler_v2_speed.py): without u2's pass, u - u2 is +0 and the base term is u + g_img*0 (no
        rounding changes it); with g_txt 1, g_txt*d is d. IEEE addition and multiplication are commutative
        (signs of zero included), so u2 + t is computed as t + u2 in place."""
        if self.bf16 and not (self.nan_seen or self.finite_outputs):
            self.nan_seen = np.count_nonzero(np.isnan(v, out=self.is_nan[: len(v)])) > 0
        if not rounded:
            self.round_(v)
        if len(passes) == 1:
            return v
        c, u = v[:B], v[B : 2 * B]
        self.round_(np.subtract(c, u, out=c))  # c <- d = c - u
        if g_txt != 1.0:
            self.round_(np.multiply(c, g_txt, out=c))
        if len(passes) == 3:  # u <- u2 + g_img*(u - u2)
            u2 = v[2 * B :]
            self.round_(np.subtract(u, u2, out=u))
            self.round_(np.multiply(u, g_img, out=u))
            self.round_(np.add(u, u2, out=u))
        else:
            np.add(u, g_img * _ZERO, out=u)
        return self.round_(np.add(u, c, out=u))

    def euler(self, x: np.ndarray, dt: np.float32, pred: np.ndarray) -> np.ndarray:
        """x + dt*pred, in place in x (pred is overwritten)."""
        self.round_(np.multiply(pred, dt, out=pred))
        return self.round_(np.add(x, pred, out=x))


def denoise(
    model: Denoiser,
    noise: np.ndarray,
    txt: np.ndarray,
    y_vec: np.ndarray,
    *,
    masks: np.ndarray,
    masked_ref: np.ndarray,
    cond_type: str,
    cfg: SamplerV2Config,
    patch_size: int = 2,
    num_steps: int | None = None,
    guidance: float | None = None,
    guidance_img: float | None = None,
    skip_redundant_pass: bool = True,
    skip_unit_scale_passes: bool = False,
    finite_outputs: bool = False,
    on_start: Callable[[], None] | None = None,
    on_step: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Denoise `noise` [B, C, T, h, w] into a latent of that shape (float32 holding bf16 values unless
    `cfg.reference_dtype` is "fp32").

    `txt` [2B, L, D] and `y_vec` [2B, V]: the B prompts' text states, then the B negative prompts' (Open-Sora
    feeds the negative twice; it is the same array, so it is encoded once). `masks`/`masked_ref` from
    `condition`. `model` is called once per step on the rows that step needs (3B, 2B or B of them) and returns
    a new array (or one it will not read again): the step's arithmetic is done in place in it.
    `finite_outputs`: `model` raises rather than return NaN or inf (the pipeline checks each output), so the
    loop does not look for NaNs in them (`_Step`).
    `on_start()` is called once the run's inputs are ready (packed, rounded, batched), before the first step;
    `on_step(i, x)` gets the packed latent [B, T*h*w/p^2, C*p^2] after step i (the loop's own array, changed by
    the next step: copy it to keep it; `unpack` gives [B, C, T, h, w]). Unpacking it each step would be
    per-step work only a caller that wants the pictures needs.
    """
    B, C, T, h, w = noise.shape
    if txt.shape[0] != 2 * B or y_vec.shape[0] != 2 * B:
        raise InputError(f"text rows {txt.shape[0]}/{y_vec.shape[0]} for a batch of {B}", hint="give [prompts; negatives]: 2B rows")
    p = patch_size
    steps = cfg.num_steps if num_steps is None else num_steps
    g_txt0 = cfg.guidance if guidance is None else guidance
    g_img0 = cfg.guidance_img if guidance_img is None else guidance_img
    timesteps = schedule(cfg, steps, h * w // p**2, T)

    rounded = functools.partial(to_reference, reference_dtype=cfg.reference_dtype)  # what a tensor of that dtype holds
    x = rounded(pack(np.asarray(noise, dtype=F32), p))
    cond = rounded(pack(np.concatenate([masks, masked_ref], axis=1).astype(F32), p))
    uncond_is_u = skip_redundant_pass and not np.any(masks)  # rows 2 and 3 are then the same input
    # the inputs of the three passes, concatenated once per set of passes the run's steps need
    rows = {"c": (txt[:B], y_vec[:B], cond), "u": (txt[B:], y_vec[B:], cond), "u2": (txt[B:], y_vec[B:], np.zeros_like(cond))}
    plan = []  # each step's (text scale, image scale or ramp, passes)
    for i in range(steps):
        g_txt, g_img = guidance_scales(cfg, i, steps, T, cond_type, g_txt0, g_img0)
        unit = g_txt == 1.0 and (uncond_is_u or np.isscalar(g_img) and g_img == 1.0)
        plan.append((g_txt, g_img, ("c",) if skip_unit_scale_passes and unit else ("c", "u") if uncond_is_u else ("c", "u", "u2")))
    batches = {passes: [np.concatenate([rows[k][j] for k in passes]) for j in range(3)] for passes in {q for _, _, q in plan}}
    ramps = {}  # each distinct image-guidance ramp over latent frames, broadcast and packed like the latent, once per run
    for _, g_img, _ in plan:
        if not np.isscalar(g_img) and g_img.tobytes() not in ramps:
            ramps[g_img.tobytes()] = rounded(pack(np.broadcast_to(g_img[None, None, :, None, None], (B, C, T, h, w)), p))
    plan = [(F32(g_txt), F32(g_img) if np.isscalar(g_img) else ramps[g_img.tobytes()], passes) for g_txt, g_img, passes in plan]
    t_vecs = [rounded(np.full(len(passes) * B, t, dtype=F32)) for t, (_, _, passes) in zip(timesteps, plan)]
    step = _Step((max(len(passes) for _, _, passes in plan) * B, *x.shape[1:]), cfg.reference_dtype)
    step.nan_seen, step.finite_outputs = bool(np.isnan(x).any()), finite_outputs
    if on_start is not None:
        on_start()
    for i, ((t_cur, t_next), (g_txt, g_img, passes)) in enumerate(zip(zip(timesteps[:-1], timesteps[1:]), plan)):
        b_txt, b_y, b_cond = batches[passes]
        v = model(np.concatenate([x] * len(passes)), b_txt, t_vecs[i], b_y, b_cond)
        if v.dtype != F32 or not (v.flags.c_contiguous and v.flags.writeable):
            v = np.array(v, dtype=F32)
        pred = step.velocity(v, B, passes, g_txt, g_img)
        x = step.euler(x, F32(t_next - t_cur), pred)
        if on_step is not None:
            on_step(i, x)
    return unpack(x, T, h // p, w // p, p)
