"""The calibration report: report.json, report.png (error per timestep / prompt / frame) and a frame
strip (full precision above, quantized below) written into the bundle."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

REPORT_JSON, REPORT_PNG, FRAME_STRIP = "report.json", "report.png", "frames.png"


def write_report(out_dir: str | os.PathLike, report: dict, reference_video: np.ndarray | None = None,
                 quantized_video: np.ndarray | None = None) -> list[str]:
    """Write the report files into `out_dir`; return their names. Videos: uint8 [F, H, W, 3]."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / REPORT_JSON, json.dumps(_finite_json(report), indent=2, default=_json_default) + "\n")
    written = [REPORT_JSON]
    plot_report(report, out / REPORT_PNG)
    written.append(REPORT_PNG)
    if reference_video is not None and quantized_video is not None:
        frame_strip(reference_video, quantized_video, out / FRAME_STRIP,
                    labels=(report.get("reference_precision", "full precision"), report.get("precision", "quantized")))
        written.append(FRAME_STRIP)
    return written


def plot_report(report: dict, path: Path) -> None:
    """Denoiser error per timestep, text encoder error per prompt, PSNR per frame of each held-out video."""
    import matplotlib

    matplotlib.use("Agg")  # no display; never pick an interactive backend
    import matplotlib.pyplot as plt

    comps = report.get("components", {})
    panels = [name for name in comps if comps[name].get("gate")] + (["video"] if report.get("video") else [])
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], panels):
        if name == "video":
            for k, v in enumerate(report["video"]["prompts"]):
                ax.plot(range(len(v["psnr_per_frame"])), _finite(v["psnr_per_frame"]), "o-", ms=3, label=f"held-out {k + 1}")
            ax.axhline(report["thresholds"]["min_psnr"], color="r", ls="--", lw=1, label="threshold")
            ax.set(title=f"decoded video vs {report.get('reference_precision', 'fp32')}", xlabel="frame", ylabel="PSNR (dB)")
        else:
            gate = comps[name]["gate"]
            rows = gate.get("per_step") or gate["samples"]
            x = [r["timestep"] for r in rows] if "per_step" in gate else list(range(len(rows)))
            ax.semilogy(x, [max(1 - r["cosine"], 1e-12) for r in rows], "o-", ms=3, label="1 - cosine")
            ax.semilogy(x, [max(r["rel_l2"], 1e-12) for r in rows], "s-", ms=3, label="relative L2")
            ax.axhline(1 - report["thresholds"]["min_cosine"], color="r", ls="--", lw=1, label="cosine threshold")
            if "per_step" in gate:
                ax.invert_xaxis()  # sampling runs from t=1000 down to 0
            else:
                ax.set_xticks(x)
            ax.set(title=f"{name} ({comps[name].get('precision', '')})",
                   xlabel="timestep" if "per_step" in gate else "held-out prompt", ylabel="error (worst prompt)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no quantized components", ha="center", va="center")
        axes[0][0].axis("off")
    verdict = "PASSED" if report.get("passed") else "FAILED"
    fig.suptitle(f"{report.get('precision', '')} quality gate: {verdict}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def frame_strip(reference: np.ndarray, quantized: np.ndarray, path: Path, columns: int = 6,
                labels: tuple[str, str] = ("full precision", "quantized")) -> None:
    """Evenly spaced frames side by side: the reference row above the quantized row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = np.unique(np.linspace(0, len(reference) - 1, min(columns, len(reference))).round().astype(int))
    h, w = reference.shape[1:3]
    scale = 1.6 / max(h, w)  # inches per pixel: ~1.6 inch panels whatever the resolution
    fig, axes = plt.subplots(2, len(picks), figsize=(len(picks) * w * scale + 0.6, 2 * h * scale + 0.5), squeeze=False)
    for row, (video, label) in enumerate(zip((reference, quantized), labels)):
        for col, i in enumerate(picks):
            ax = axes[row][col]
            ax.imshow(video[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"frame {i}", fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _finite(values):
    return [v if math.isfinite(v) else np.nan for v in values]  # identical frames: PSNR inf


def _finite_json(o):
    """JSON has no inf/nan: an identical frame's PSNR (inf) is written as null."""
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_json(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
