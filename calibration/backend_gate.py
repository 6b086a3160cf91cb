"""The quality gate for a backend that computes below the bundle's precision (OpenVINO's bf16 denoiser).

Same thresholds, held-out inputs and videos as the INT8 gate (osx.calibration.gate): the component's
output on the calibration set's held-out samples, per timestep, and the held-out prompts' decoded videos,
each against the same bundle on onnxruntime at its own precision.
"""

from __future__ import annotations

import os

from osx.calibration import gate
from osx.calibration.calibset import CalibrationSet
from osx.calibration.shards import ShardReader


def gate_backend(bundle: str | os.PathLike, backend: str, calibration: str | os.PathLike,
                 thresholds: gate.Thresholds = gate.Thresholds(), component: str = "denoiser",
                 heldout_limit: int | None = None, video: bool = True) -> gate.GateResult:
    """Judge `backend` (a name in osx.runtime.backends.BACKENDS) running `bundle` against onnxruntime."""
    from osx.bundle import Bundle
    from osx.runtime.backends import create_backend
    from osx.runtime.pipeline import Pipeline

    b = Bundle.open(bundle)
    calib = CalibrationSet.open(calibration)
    calib.check_model(b.manifest.model["name"])
    ref, cand = create_backend(b, component, "onnxruntime"), create_backend(b, component, backend)
    out = b.spec(component).outputs[0].name
    try:
        m = gate.compare_runs(component, lambda feed: ref.run(feed)[out], lambda feed: cand.run(feed)[out],
                              {k: v.name for k, v in ref.dtypes.items()},
                              ShardReader(calib.shards("heldout", component)), heldout_limit)
    finally:
        ref.release()
        cand.release()
    summary = None
    if video:
        held, recipe = calib.recipe["heldout"], calib.recipe
        size = {"height": recipe["height"], "width": recipe["width"], "num_frames": recipe["num_frames"]}
        videos = {}
        for name in ("onnxruntime", backend):
            pipe = Pipeline.load(b, name)
            try:
                videos[name] = [pipe.generate(p, seed=s, **size) for p, s in zip(held["prompts"], held["seeds"])]
            finally:
                pipe.release()
        summary = gate.video_summary(size, held["prompts"], videos[backend], videos["onnxruntime"])
    return gate.judge({component: m}, summary, thresholds)
