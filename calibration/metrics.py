"""Quality metrics for the quantization gate (numpy only).

Tensor metrics compare a component's output against full precision; video metrics compare decoded
frames (uint8 or floats in a known range) of a quantized run against the full-precision run made with
the same seed and noise.
"""

from __future__ import annotations

import numpy as np


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of the flattened arrays (1.0 when both are all zeros)."""
    a, b = _f64(a).ravel(), _f64(b).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def rel_l2(test: np.ndarray, ref: np.ndarray) -> float:
    """||test - ref|| / ||ref|| (inf when ref is zero and test is not)."""
    test, ref = _f64(test), _f64(ref)
    err, norm = np.linalg.norm(test - ref), np.linalg.norm(ref)
    if norm == 0:
        return 0.0 if err == 0 else float("inf")
    return float(err / norm)


def psnr(test: np.ndarray, ref: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical inputs)."""
    mse = np.mean((_f64(test) - _f64(ref)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ssim(test: np.ndarray, ref: np.ndarray, data_range: float = 255.0, win_size: int = 7) -> float:
    """Mean structural similarity of two images [H, W] or [H, W, C] (channels averaged).

    Wang et al. 2004 with a uniform win_size x win_size window, K1=0.01, K2=0.03 and the sample
    (N-1) covariance, averaged over the windows that fit inside the image: the same definition as
    scikit-image's `structural_similarity` defaults.
    """
    x, y = _f64(test), _f64(ref)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {x.shape} vs {y.shape}")
    if x.ndim == 3:
        return float(np.mean([ssim(x[..., c], y[..., c], data_range, win_size) for c in range(x.shape[-1])]))
    win = min(win_size, *x.shape)
    win -= 1 - win % 2  # odd window
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win * win
    mx, my = _box_mean(x, win), _box_mean(y, win)
    cov = n / (n - 1)
    vx = cov * (_box_mean(x * x, win) - mx * mx)
    vy = cov * (_box_mean(y * y, win) - my * my)
    vxy = cov * (_box_mean(x * y, win) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def _box_mean(a: np.ndarray, win: int) -> np.ndarray:
    """Mean over every win x win window fully inside `a` (valid windows only), via summed-area tables."""
    s = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (s[win:, win:] - s[:-win, win:] - s[win:, :-win] + s[:-win, :-win]) / (win * win)


def video_metrics(test: np.ndarray, ref: np.ndarray, data_range: float = 255.0) -> dict:
    """Per-frame PSNR / SSIM and temporal flicker of `test` vs `ref`, both [F, H, W, C].

    Flicker: the mean absolute frame-to-frame change of each video; `flicker_ratio` = test / ref, so
    1.0 means the quantized video moves as much as the reference and > 1 means it shimmers more.
    """
    if test.shape != ref.shape or test.ndim != 4:
        raise ValueError(f"video_metrics: expected two [F,H,W,C] videos of one shape, got {test.shape} and {ref.shape}")
    psnrs = [psnr(t, r, data_range) for t, r in zip(test, ref)]
    ssims = [ssim(t, r, data_range) for t, r in zip(test, ref)]
    flicker_test, flicker_ref = temporal_flicker(test), temporal_flicker(ref)
    return {
        "psnr_per_frame": psnrs,
        "ssim_per_frame": ssims,
        "psnr_min": min(psnrs),
        "psnr_mean": float(np.mean(psnrs)),
        "ssim_min": min(ssims),
        "ssim_mean": float(np.mean(ssims)),
        "flicker": flicker_test,
        "flicker_ref": flicker_ref,
        "flicker_ratio": flicker_test / flicker_ref if flicker_ref > 0 else (1.0 if flicker_test == 0 else float("inf")),
    }


def temporal_flicker(video: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames of [F, ...] (0 for a single frame)."""
    v = _f64(video)
    return float(np.abs(np.diff(v, axis=0)).mean()) if len(v) > 1 else 0.0


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)
