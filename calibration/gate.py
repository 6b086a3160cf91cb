"""The quality gate: is a quantized component still the same model?

Component level, on onnxruntime: the quantized graph and the full-precision graph run on the same
held-out inputs (captured from the reference pipeline on prompts never used for calibration); the
denoiser's output is compared per timestep (worst prompt at each step), the text encoder's per prompt
over the real (unpadded) tokens. End to end: decoded videos of a full-precision and a quantized
bundle generated with the same seed and noise, compared frame by frame (PSNR, SSIM) plus temporal
flicker (metrics.video_metrics).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from osx.calibration import metrics
from osx.errors import OsxError


class QualityGateError(OsxError):
    """A quantized component failed the quality gate."""


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float = 0.99  # denoiser output per step (worst prompt), text embeddings per prompt
    min_psnr: float = 30.0  # dB, every decoded frame vs full precision
    max_rel_l2: float | None = None  # optional: relative L2 of the component output
    min_ssim: float | None = None  # optional: every decoded frame
    max_flicker_ratio: float | None = None  # optional: quantized / reference frame-to-frame change

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class GateResult:
    passed: bool
    failures: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)

    def summary(self) -> str:
        return "passed" if self.passed else "; ".join(self.failures)


def session(path: Path):
    """A CPU onnxruntime session with default (full) graph optimisation, as the runtime makes one.
    Measured with onnxruntime 1.32: ModelOpt's FP8 graphs (fp32 outside the Q/DQ pairs) give the same
    output at every optimisation level."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_component(component: str, reference: Path, quantized: Path, samples: Iterable[dict[str, np.ndarray]],
                      limit: int | None = None) -> dict:
    """Run both graphs on each held-out sample and compare the first output (`compare_runs`)."""
    from osx.calibration.quantize import graph_inputs

    ref_sess, q_sess = session(reference), session(quantized)
    return compare_runs(component, lambda feed: ref_sess.run(None, feed)[0], lambda feed: q_sess.run(None, feed)[0],
                        graph_inputs(reference), samples, limit)


def compare_runs(component: str, reference: Callable, candidate: Callable, dtypes: dict[str, str],
                 samples: Iterable[dict[str, np.ndarray]], limit: int | None = None) -> dict:
    """Feed each held-out sample (its `dtypes` inputs) to both runners (feed -> first output) and compare.

    Returns {"samples": [{"timestep"?, "cosine", "rel_l2"}...], "per_step"?: [...], "min_cosine", "max_rel_l2"}.
    """
    rows = []
    for i, sample in enumerate(samples):
        if limit is not None and i >= limit:
            break
        feed = {k: sample[k].astype(dtype, copy=False) for k, dtype in dtypes.items()}
        want = reference(feed)
        got = candidate(feed)
        row = {}
        if component == "text_encoder":  # only real tokens reach the denoiser
            keep = sample["attention_mask"].astype(bool)
            want, got = want[keep], got[keep]
        if "timestep" in sample:
            row["timestep"] = float(sample["timestep"].ravel()[0])
        row["cosine"], row["rel_l2"] = metrics.cosine(got, want), metrics.rel_l2(got, want)
        rows.append(row)
    if not rows:
        raise OsxError(f"no held-out samples to compare {component} on", hint="re-run `osx calibrate`")
    out = {"samples": rows, "min_cosine": min(r["cosine"] for r in rows), "max_rel_l2": max(r["rel_l2"] for r in rows)}
    if all("timestep" in r for r in rows):
        steps = sorted({r["timestep"] for r in rows}, reverse=True)  # sampling order: t = 1000 -> 0
        out["per_step"] = [
            {"timestep": t,
             "cosine": min(r["cosine"] for r in rows if r["timestep"] == t),
             "rel_l2": max(r["rel_l2"] for r in rows if r["timestep"] == t)}
            for t in steps
        ]
    return out


def video_summary(size: dict, prompts: list[str], videos: list[np.ndarray], ref_videos: list[np.ndarray]) -> dict:
    """video_metrics of each held-out prompt's video against its reference, and the worst over them."""
    per_prompt = [{"prompt": p, **metrics.video_metrics(q, r)} for p, q, r in zip(prompts, videos, ref_videos)]
    return {"size": size, "prompts": per_prompt,
            "psnr_min": min(v["psnr_min"] for v in per_prompt),
            "psnr_mean": sum(v["psnr_mean"] for v in per_prompt) / len(per_prompt),
            "ssim_min": min(v["ssim_min"] for v in per_prompt),
            "flicker_ratio": max(v["flicker_ratio"] for v in per_prompt)}


def judge(component_metrics: dict[str, dict], video: dict | None, thresholds: Thresholds) -> GateResult:
    """Apply the thresholds to compare_component results (by component) and video_metrics (or None)."""
    t, failures = thresholds, []
    for name, m in component_metrics.items():
        for row in m.get("per_step") or m["samples"]:
            where = f"at t={row['timestep']:.1f}" if "timestep" in row else "on a held-out prompt"
            if row["cosine"] < t.min_cosine:
                failures.append(f"{name}: cosine {row['cosine']:.4f} < {t.min_cosine} {where}")
                break
        if t.max_rel_l2 is not None and m["max_rel_l2"] > t.max_rel_l2:
            failures.append(f"{name}: relative L2 {m['max_rel_l2']:.4f} > {t.max_rel_l2}")
    if video is not None:
        if video["psnr_min"] < t.min_psnr:
            failures.append(f"video: PSNR {video['psnr_min']:.2f} dB < {t.min_psnr} dB on the worst frame")
        if t.min_ssim is not None and video["ssim_min"] < t.min_ssim:
            failures.append(f"video: SSIM {video['ssim_min']:.4f} < {t.min_ssim} on the worst frame")
        if t.max_flicker_ratio is not None and video["flicker_ratio"] > t.max_flicker_ratio:
            failures.append(f"video: flicker {video['flicker_ratio']:.3f}x the reference's > {t.max_flicker_ratio}x")
    metrics_out = {"components": component_metrics, "thresholds": t.to_dict()}
    if video is not None:
        metrics_out["video"] = video
    return GateResult(not failures, failures, metrics_out)


def enforce(result: GateResult, precision: str, allow_quality_loss: bool, report: Path | None = None) -> None:
    """Raise QualityGateError for a failed gate unless the user accepted the loss."""
    if result.passed or allow_quality_loss:
        return
    where = f" (report: {report})" if report else ""
    raise QualityGateError(
        f"{precision} quantization failed the quality gate{where}: " + "; ".join(result.failures),
        hint="use a higher precision (--precision fp16), calibrate with more samples, relax the thresholds, "
        "or pass --allow-quality-loss to keep it anyway",
    )
