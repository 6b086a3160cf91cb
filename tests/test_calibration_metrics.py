"""Gate metrics vs hand formulas on known cases and vs scikit-image's independent implementation."""

import math

import numpy as np
import pytest

from osx.calibration import metrics


def test_cosine_known_angles():
    assert metrics.cosine([1, 0], [0, 3]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.cosine([2, 2], [5, 5]) == pytest.approx(1.0, abs=1e-12)
    assert metrics.cosine([1, 0], [1, 1]) == pytest.approx(math.cos(math.pi / 4), abs=1e-12)
    assert metrics.cosine([1, 2], [-1, -2]) == pytest.approx(-1.0, abs=1e-12)


def test_rel_l2_known_case():
    ref = np.array([3.0, 4.0])  # norm 5
    assert metrics.rel_l2(ref + [0.0, 0.5], ref) == pytest.approx(0.1, abs=1e-12)
    assert metrics.rel_l2(ref, ref) == 0.0


def test_psnr_constant_offset():
    ref = np.full((8, 8), 100.0)
    # mse = 5^2 -> 20*log10(255/5)
    assert metrics.psnr(ref + 5, ref) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)
    assert metrics.psnr(ref / 255 + 0.1, ref / 255, data_range=1.0) == pytest.approx(20.0, abs=1e-9)
    assert metrics.psnr(ref, ref) == float("inf")


def test_ssim_constant_images_hand_formula():
    # Zero variance everywhere: SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 255)^2.
    a, b, c1 = 100.0, 120.0, (0.01 * 255) ** 2
    got = metrics.ssim(np.full((16, 16), b), np.full((16, 16), a))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    img = np.random.default_rng(0).uniform(0, 255, (20, 20))
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(32, 40), (24, 24, 3)])
def test_psnr_ssim_match_scikit_image(shape):
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is the independent reference (pip install scikit-image)")
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, shape).astype(np.uint8)
    test = np.clip(ref.astype(int) + rng.integers(-20, 21, shape), 0, 255).astype(np.uint8)
    assert metrics.psnr(test, ref) == pytest.approx(skm.peak_signal_noise_ratio(ref, test, data_range=255), abs=1e-9)
    want = skm.structural_similarity(ref, test, data_range=255, channel_axis=-1 if len(shape) == 3 else None)
    assert metrics.ssim(test, ref) == pytest.approx(want, abs=1e-9)


def test_video_metrics_and_flicker():
    ref = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 10, 20)])  # flicker 10
    test = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 20, 0)])  # flicker 20
    m = metrics.video_metrics(test, ref)
    assert m["flicker_ref"] == pytest.approx(10.0)
    assert m["flicker"] == pytest.approx(20.0)
    assert m["flicker_ratio"] == pytest.approx(2.0)
    assert m["psnr_per_frame"][0] == float("inf")
    assert m["psnr_per_frame"][1] == pytest.approx(20 * math.log10(255 / 10))
    assert m["psnr_min"] == pytest.approx(20 * math.log10(255 / 20))
    assert len(m["ssim_per_frame"]) == 3
