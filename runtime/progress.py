"""Progress events of one generation: the contract between every pipeline and what shows progress (the CLI's
bars and `--progress-json`, `osx serve`'s job status, the shim's JSON lines to C/C++ hosts).

An event is a dict {"phase", "step", "total", "elapsed", "eta"}: step k of `total` in `phase` is done,
`elapsed` seconds since the generation started, `eta` the seconds the phase still needs. The phases, in the
order a run reports them (each only when the run has it):

    text_encoder  the text encoders (1 step)
    t2i           t2i2v's image step: Flux.1-dev's sampling loop (1 step per sampling step)
    t2i_decode    that image through Flux's AE decoder (1 step)
    vae_encode    a reference image or video through the video VAE's encoder (1 step; image-to-video, video
                  continuation, each extension clip, t2i2v); a reference given with the request is encoded
                  before text_encoder (`progress_phases(request, reference=True)` lists it first)
    denoise       the video's sampling loop
    vae_decode    the video VAE's decoder (1 step per chunk or tile)

A text-to-image-to-video run has two sampling loops, `t2i` then `denoise`; a caller that shows a bar per loop
opens one for each phase in SAMPLING_LOOPS. Video extension (`extend` N) runs denoise and vae_decode once per
clip (and vae_encode for each clip after the first); those events then carry "clip" (1-based) and "clips"
(N + 1), and `step` counts within the clip. A pipeline says beforehand which phases a request will report, with
their totals (`progress_phases(request)`), so a caller can weigh them (`Fractions`).
"""

from __future__ import annotations

from typing import Callable

PHASES = ("text_encoder", "t2i", "t2i_decode", "vae_encode", "denoise", "vae_decode")
SAMPLING_LOOPS = ("t2i", "denoise")
Progress = Callable[[dict], "bool | None"]


class Fractions:
    """The fraction of a run done at each event, counting every step of every phase as one unit of work, plus
    `extra` units after the last phase (e.g. writing the file). `phases`: [(phase, total)] in run order."""

    def __init__(self, phases: list[tuple[str, int]], extra: int = 0):
        self.before, done = {}, 0
        for phase, total in phases:
            self.before[phase] = done
            done += total
        self.total = done + extra
        self.last = 0.0

    def __call__(self, event: dict) -> float:
        """Never falls back: an event of a phase the run did not announce keeps the previous fraction."""
        if event["phase"] in self.before:
            self.last = max(self.last, (self.before[event["phase"]] + event["step"]) / self.total)
        return self.last
