"""`osx generate BUNDLE --prompt ... --out clip.mp4`: text to video with a bundle, no torch.

Order of work: output paths are checked first, then the bundle is opened and the request checked
against it, and only then does anything compute, so a typo costs seconds, not a generation.
"""

from __future__ import annotations

import json
import re
import sys
import time
import warnings
from pathlib import Path

import click

from osx.runtime.backends import AUTO, BACKENDS, auto_backend
from osx.runtime.progress import SAMPLING_LOOPS
from osx.runtime.video import CODECS
from osx.numeric import format_size


def _resolution(ctx, param, value):
    """WxH -> (width, height); a bucket name such as 256px (Open-Sora v2.0) stays a string."""
    if value is None:
        return None
    if re.fullmatch(r"\d+px", value.strip()):
        return value.strip()
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r} is not WIDTHxHEIGHT (e.g. 426x240) or a resolution name (e.g. 256px)")
    return int(m.group(1)), int(m.group(2))


@click.command("generate")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="What the video shows. Empty is allowed (Open-Sora then conditions on its suffixes alone: v1.2 the aesthetic score, v2.0 FPS and motion score).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Video file: .mp4 (h264 / mp4v) or .webm (vp9).")
@click.option("--negative-prompt", default=None, help="What to steer away from (v1.2: replaces the learned null caption; v2.0: default empty).")
@click.option("--seed", type=int, default=None, help="Noise seed (default: the bundle's, 42). Same seed, same video.")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the bundle's).")
@click.option("--guidance-scale", type=float, default=None, help="Classifier-free guidance scale (default: the bundle's).")
@click.option("--frames", "--num-frames", "num_frames", type=int, default=None,
              help="Number of frames (default: the bundle's). Open-Sora v2.0: 4k+1 (1, 5, ..., 129).")
@click.option("--resolution", callback=_resolution, default=None, metavar="WxH|NAME",
              help="Width x height in pixels, e.g. 426x240; Open-Sora v2.0: a resolution (256px, 768px) or a size of one.")
@click.option("--aspect-ratio", default=None, metavar="W:H",
              help="Open-Sora v2.0: the aspect ratio of the --resolution bucket, e.g. 16:9, 9:16, 1:1 (default: the bundle's).")
@click.option("--fps", type=float, default=None, help="Frame rate, for the model's conditioning and the file (default 24).")
@click.option("--codec", type=click.Choice(CODECS), default="auto", show_default=True,
              help="h264 needs PyAV (GPL x264, README); auto = vp9 for .webm, h264 if PyAV is installed, else mp4v.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write a PNG contact sheet of a few frames.")
@click.option("--backend", type=click.Choice([*BACKENDS, AUTO]), default=None,
              help="Run every component with this backend (default: what the bundle's manifest says). auto: OpenVINO "
                   "(bf16) for a v1.2 CPU bundle's denoiser where the `openvino` extra is installed and the CPU has "
                   "native bf16, the manifest's backend for the rest.")
@click.option("--image", type=click.Path(path_type=Path), default=None,
              help="Reference image (PNG, JPEG, ...): image-to-video. Resized to fill and centre-cropped. Needs a bundle "
                   "exported with --with-vae-encoder.")
@click.option("--condition", type=click.Choice(["head", "tail", "loop", "head_easy", "tail_easy"]), default="head",
              show_default=True, help="Where --image goes: the first frame, the last, or both; --video: head or tail, "
                                      "or head_easy / tail_easy with 65 frames (v2.0), head (v1.2).")
@click.option("--video", type=click.Path(path_type=Path), default=None,
              help="Reference video (mp4, webm, ...). v1.2: continued, its last 17 frames become the new clip's first 17 "
                   "(Open-Sora's video extension); v2.0: its first (--condition head) or last (tail) 33 frames (65: *_easy) "
                   "hold the clip's first or last 33 (65). Needs a bundle with the VAE encoder.")
@click.option("--image-guidance-scale", "guidance_img", type=float, default=None,
              help="Open-Sora v2.0: guidance towards the --image/--video reference (default: the bundle's, 3).")
@click.option("--t2i2v/--no-t2i2v", "t2i2v", default=None,
              help="Open-Sora v2.0, text -> image -> video: Flux.1-dev makes the first frame, then the video animates it "
                   "(Open-Sora's recommended flow). Default: on for a bundle exported with --with-t2i, unless --image/--video.")
@click.option("--t2i-steps", type=int, default=None,
              help="Open-Sora v2.0 text -> image -> video: sampling steps of the first frame (Flux.1-dev), 1 to 1000 "
                   "(default: the model's, 50).")
@click.option("--extend", type=click.IntRange(0), default=0, show_default=True,
              help="Append N more clips, each continuing the one before from its last 17 frames; the joined video "
                   "has frames + N x (frames - 17) frames. Each clip is a whole generation.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (sizes are still checked).")
@click.option("--progress-json", is_flag=True, help="Print progress and the result as JSON lines on stdout instead of a bar.")
def generate(bundle, prompt, out, negative_prompt, seed, steps, guidance_scale, num_frames, resolution, aspect_ratio, fps, codec,
             preview, backend, image, condition, video, guidance_img, t2i2v, t2i_steps, extend, no_verify, progress_json):
    """Generate a video from PROMPT with the bundle at BUNDLE (a folder written by `osx export`)."""
    from osx.runtime.conditioning import load_image
    from osx.runtime.pipeline import Pipeline
    from osx.runtime.video import check_writable, resolve_codec, write_preview, write_video

    start = time.perf_counter()
    if image is not None and video is not None:
        raise click.UsageError("pass --image or --video, not both")
    check_writable(out, codec)
    codec = resolve_codec(out, codec)
    if preview is not None:
        check_writable(preview, suffixes=(".png",))
    width, height = resolution if isinstance(resolution, tuple) else (None, None)
    bucket = {k: v for k, v in (("resolution", resolution if isinstance(resolution, str) else None),
                                ("aspect_ratio", aspect_ratio), ("guidance_img", guidance_img), ("t2i2v", t2i2v),
                                ("t2i_steps", t2i_steps))
              if v is not None}  # v2.0's

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *_, **__: click.secho(f"warning: {message}", fg="yellow", err=True)
        pipe = Pipeline.load(bundle, backend, verify=not no_verify)
        if backend == AUTO:
            chosen = {c: auto_backend(pipe.bundle, c) for c in pipe.backends}
            click.echo("backend auto: " + ", ".join(f"{c} {name}" for c, name in chosen.items()), err=True)
        request = pipe.prepare_request(prompt, negative_prompt, num_frames=num_frames, height=height, width=width, fps=fps,
                                       steps=steps, guidance_scale=guidance_scale, seed=seed, **bucket)
        # a bad reference fails here, before any compute
        pixels = None if image is None else load_image(image)
        clip = None if video is None else pipe.read_reference_video(video, condition)
        show = _json_progress if progress_json else _BarProgress()
        try:
            frames = pipe.run(request, progress=show, image=pixels, condition=condition, video=clip, extend=extend)
        finally:
            if not progress_json:
                show.close()
    write_video(frames, out, request.fps, codec)
    if preview is not None:
        write_preview(frames, preview)
    seconds = time.perf_counter() - start
    h, w = frames.shape[1:3]
    if progress_json:
        _emit({"event": "done", "out": str(out), "frames": len(frames), "width": w, "height": h, "fps": request.fps,
               "seed": request.seed, "codec": codec, "seconds": round(seconds, 3),
               "preview": str(preview) if preview is not None else None})
    else:
        click.echo(f"wrote {out}: {len(frames)} frames, {format_size(w, h)}, {request.fps:g} fps, {codec}, seed {request.seed}, "
                   f"{seconds:.1f} s" + (f" (preview {preview})" if preview is not None else ""))


def _emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _json_progress(event: dict) -> None:
    _emit({"event": "progress", **{k: round(v, 3) if isinstance(v, float) else v for k, v in event.items()}})


class _BarProgress:
    """A tqdm bar (it/s) per sampling loop (osx.runtime.progress.SAMPLING_LOOPS: t2i2v's image, then the
    video), each opened at its first step so that warnings from the prompt stage print on their own lines; a
    line when a decoder is done."""

    LABELS = {"t2i": "image (Flux)", "denoise": "denoising"}

    def __init__(self):
        self.bar = self.phase = None

    def __call__(self, event: dict) -> None:
        phase = event["phase"]
        clip = f" (clip {event['clip']} of {event['clips']})" if "clip" in event else ""  # video extension
        if phase in SAMPLING_LOOPS:
            if self.phase != phase + clip:
                from tqdm import tqdm

                self.close()
                self.bar = tqdm(total=event["total"], desc=self.LABELS[phase] + clip, unit="it", file=sys.stderr, dynamic_ncols=True)
                self.phase = phase + clip
            self.bar.update(event["step"] - self.bar.n)
        elif phase in ("vae_decode", "t2i_decode") and event["step"] == event["total"]:
            self.close()
            click.echo(f"decoded in {event['total']} VAE call(s){clip}" if phase == "vae_decode" else "decoded the first frame", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
