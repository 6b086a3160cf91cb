"""Frames to files: uint8 conversion as Open-Sora saves, mp4/webm writers, a PNG contact sheet.

Writers (README "Video codecs and licensing"):
  h264  PyAV (`pip install -e '.[h264]'`): its wheel bundles FFmpeg with libx264, which is GPL.
  mp4v  OpenCV (base install, permissive licences): MPEG-4 Part 2 in .mp4; plays nearly everywhere
        but is larger than H.264 for the same quality.
  vp9   OpenCV: VP9 in .webm (browsers play it).
`codec="auto"` picks vp9 for .webm, else h264 when PyAV is importable, else mp4v, and logs its choice.
Every file is written under a temporary name beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import secrets
from collections import deque
from fractions import Fraction
from pathlib import Path

import numpy as np

from osx.errors import InputError, OsxError

log = logging.getLogger(__name__)

CODECS = ("auto", "h264", "mp4v", "vp9")
X264_THREADS = 4  # fixed, so the bytes do not depend on the machine (see _write_pyav)
EXTENSIONS = {"h264": (".mp4", ".mkv", ".mov"), "mp4v": (".mp4",), "vp9": (".webm",)}


def to_uint8_frames(video: np.ndarray) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3], as Open-Sora's save_sample: clamp, (x + 1) / 2,
    * 255 + 0.5, clamp, truncate to uint8 (float32 throughout)."""
    x = np.clip(np.asarray(video, dtype=np.float32), -1, 1)
    x = np.clip((x + np.float32(1)) / np.float32(2) * np.float32(255) + np.float32(0.5), 0, 255)
    return np.ascontiguousarray(x.astype(np.uint8).transpose(1, 2, 3, 0))


def has_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


def resolve_codec(path: str | os.PathLike, codec: str = "auto") -> str:
    """The writer `write_video` will use for `path`; raises OsxError for an unusable combination."""
    suffix = Path(path).suffix.lower()
    if codec not in CODECS:
        raise OsxError(f"unknown codec {codec!r}", hint=f"choose one of {', '.join(CODECS)}")
    if codec == "auto":
        codec = "vp9" if suffix == ".webm" else "h264" if has_pyav() else "mp4v"
    if suffix not in EXTENSIONS[codec]:
        raise OsxError(f"{path}: codec {codec} writes {'/'.join(EXTENSIONS[codec])} files, not {suffix or 'no extension'!r}",
                       hint="name the output .mp4 (h264 or mp4v) or .webm (vp9), or pick another --codec")
    if codec == "h264" and not has_pyav():
        raise OsxError("H.264 needs PyAV, which is not installed",
                       hint="pip install -e '.[h264]' (PyAV bundles GPL x264; see the README), or use --codec mp4v")
    return codec


def check_writable(path: str | os.PathLike, codec: str = "auto", suffixes: tuple[str, ...] | None = None) -> Path:
    """Fail fast, before any compute, if `path` cannot be written: missing or read-only folder, a folder
    in the way, or an extension the codec cannot write (or not in `suffixes` when given, e.g. (".png",))."""
    if "\0" in os.fspath(path):  # the OS would cut the name there: a stray file under another name
        raise OsxError(f"cannot write {os.fspath(path)!r}: the name contains a NUL byte", hint="give a plain file name")
    path = Path(path)
    if suffixes is not None:
        if path.suffix.lower() not in suffixes:
            raise OsxError(f"{path}: expected a {'/'.join(suffixes)} file", hint=f"name it like out{suffixes[0]}")
    else:
        resolve_codec(path, codec)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OsxError(f"cannot write {path}: folder {folder} does not exist", hint=f"create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OsxError(f"cannot write {path}: folder {folder} is not writable", hint="choose a folder you can write to")
    if path.is_dir():
        raise OsxError(f"cannot write {path}: it is a folder", hint="give a file name, e.g. clip.mp4")
    if path.exists() and not os.access(path, os.W_OK):
        raise OsxError(f"cannot overwrite {path}: it is read-only", hint="remove it or choose another name")
    return path


def write_video(frames: np.ndarray, path: str | os.PathLike, fps: float, codec: str = "auto") -> Path:
    """Write uint8 frames [T, H, W, 3] (RGB) at `fps`; returns the path. Odd sizes are padded by
    repeating the last row/column for H.264 (its yuv420p needs even sizes)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    path = check_writable(path, codec)
    codec = resolve_codec(path, codec)
    log.info("writing %s: %d frames %dx%d at %s fps with %s", path, len(frames), frames.shape[2], frames.shape[1], fps,
             {"h264": "H.264 (PyAV, libx264)", "mp4v": "MPEG-4 Part 2 (OpenCV mp4v)", "vp9": "VP9 (OpenCV)"}[codec])
    with _atomic(path) as tmp:
        (_write_pyav if codec == "h264" else _write_cv2)(frames, tmp, fps, codec)
    return path


@contextlib.contextmanager
def _atomic(path: Path):
    # Same folder (so the rename is atomic), same suffix (writers pick the container from it).
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_pyav(frames: np.ndarray, path: Path, fps: float, codec: str) -> None:
    import av

    h, w = frames.shape[1:3]
    if h % 2 or w % 2:  # yuv420p subsamples chroma 2x2
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        log.info("padded %dx%d to %dx%d for yuv420p", w, h, frames.shape[2], frames.shape[1])
    with av.open(str(path), mode="w", format="mp4" if path.suffix.lower() == ".mp4" else None) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # The same frames must give the same file (a served video equals `osx generate`'s). Measured with
        # PyAV 18 (x264 core 165): x264's AVX-512 code wrote different files for the same frames depending
        # on what ran before in the process (an onnxruntime denoising run, other encoders in other threads);
        # its AVX2, SSE2 and plain C code did not. So AVX-512 is left out (every AVX-512 CPU has AVX2). The
        # thread count is fixed too: x264's output follows it, and its default follows the machine's cores.
        stream.codec_context.thread_count = X264_THREADS
        if _has_avx512():
            stream.codec_context.options = {"x264-params": "asm=AVX2"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


@functools.cache
def _has_avx512() -> bool:
    """True where the CPU (Linux's /proc/cpuinfo) has AVX-512, which x264 would use (see _write_pyav)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def _write_cv2(frames: np.ndarray, path: Path, fps: float, codec: str) -> None:
    import cv2

    h, w = frames.shape[1:3]
    with _quiet_stderr():  # OpenCV's FFmpeg prints a harmless "tag ... not supported" for VP9 in webm
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*{"mp4v": "mp4v", "vp9": "VP90"}[codec]), float(fps), (w, h))
    if not writer.isOpened():
        raise OsxError(f"OpenCV cannot open a {codec} writer for {path}", hint="try another --codec")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV wants BGR
    finally:
        writer.release()


@contextlib.contextmanager
def _quiet_stderr():
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def contact_sheet_layout(num_frames: int, height: int, width: int, n: int = 6, max_tile_width: int = 512, gap: int = 4):
    """(frame indices, columns, rows, tile height, tile width, gap) of `write_preview`'s sheet."""
    n = max(1, min(n, num_frames))
    indices = np.linspace(0, num_frames - 1, n).round().astype(int).tolist()
    rows = math.ceil(n / 4)  # at most 4 per row, rows filled evenly (6 -> 3 + 3, not 4 + 2)
    cols = math.ceil(n / rows)
    scale = min(1.0, max_tile_width / width)
    return indices, cols, rows, max(1, round(height * scale)), max(1, round(width * scale)), gap


def write_preview(frames: np.ndarray, png_path: str | os.PathLike, n: int = 6) -> Path:
    """A PNG contact sheet of `n` frames spread evenly over the clip (first and last included),
    at most 4 per row in evenly filled rows, tiles at most 512 px wide, separated by a 4 px dark gap."""
    import cv2

    if not 1 <= n <= 16:
        raise ValueError(f"preview takes 1..16 frames, got {n}")
    path = check_writable(png_path, suffixes=(".png",))
    indices, cols, rows, th, tw, gap = contact_sheet_layout(len(frames), frames.shape[1], frames.shape[2], n)
    sheet = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap, 3), 16, np.uint8)
    for k, i in enumerate(indices):
        r, c = divmod(k, cols)
        tile = frames[i] if (th, tw) == frames.shape[1:3] else cv2.resize(frames[i], (tw, th), interpolation=cv2.INTER_AREA)
        sheet[r * (th + gap): r * (th + gap) + th, c * (tw + gap): c * (tw + gap) + tw] = tile
    with _atomic(path) as tmp:
        if not cv2.imwrite(str(tmp), sheet[..., ::-1]):
            raise OsxError(f"could not write {path}")
    return path


def read_video_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frame count, height, width) by decoding every frame (PyAV if installed, else OpenCV)."""
    if has_pyav():
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            count = sum(1 for _ in container.decode(stream))
            return count, stream.height, stream.width
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        count, shape = 0, (0, 0)
        while True:
            ok, frame = cap.read()
            if not ok:
                return count, shape[0], shape[1]
            count, shape = count + 1, frame.shape[:2]
    finally:
        cap.release()


MAX_READ_FRAMES = 50_000  # a reference video is decoded to its end: about 35 minutes at 24 fps
MAX_READ_SIDE = 8192


def read_frames(path: str | os.PathLike, count: int, *, end: bool = True) -> np.ndarray:
    """The last (`end`) or first `count` frames of a video file as uint8 RGB [F <= count, H, W, 3], decoded
    with PyAV if installed, else OpenCV. A missing, broken, empty or still-image file, or one too long or too
    large to decode, is an InputError that says so."""
    name = str(path)
    if not os.path.isfile(path):
        raise InputError(f"reference video {name!r} does not exist or is not a file")
    frames: deque = deque(maxlen=count)
    decoded = 0
    for frame in (_decode_pyav if has_pyav() else _decode_cv2)(name):
        if not end and decoded == count:
            break
        decoded += 1
        if decoded > MAX_READ_FRAMES:
            raise InputError(f"reference video {name!r} has more than {MAX_READ_FRAMES} frames",
                             hint="only its end is used: cut it first, e.g. `ffmpeg -sseof -3 -i in.mp4 end.mp4`")
        if max(frame.shape[:2]) > MAX_READ_SIDE:
            raise InputError(f"reference video {name!r} is {frame.shape[1]}x{frame.shape[0]} (WxH); at most "
                             f"{MAX_READ_SIDE} pixels a side are read", hint="scale it down first")
        frames.append(frame)
    if not frames:
        raise InputError(f"reference video {name!r} has no frames that decode", hint="pass an mp4, webm, mov or mkv video")
    return np.stack(frames)


def _decode_pyav(name: str):
    import av

    try:
        with av.open(name) as container:
            if container.format.name == "image2" or container.format.name.endswith("_pipe") or not container.streams.video:
                raise InputError(f"reference video {name!r} is not a video ({container.format.long_name})",
                                 hint="a still image conditions with --image; --video takes an mp4, webm, mov or mkv file")
            for frame in container.decode(container.streams.video[0]):
                yield frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"reference video {name!r} is not a readable video ({e})",
                         hint="pass an mp4, webm, mov or mkv video") from None


def _decode_cv2(name: str):
    import cv2

    cap = cv2.VideoCapture(name)
    try:
        if not cap.isOpened():
            raise InputError(f"reference video {name!r} is not a readable video", hint="pass an mp4, webm, mov or mkv video")
        if cap.getBackendName() == "CV_IMAGES":
            raise InputError(f"reference video {name!r} is a still image, not a video",
                             hint="a still image conditions with --image; --video takes an mp4, webm, mov or mkv file")
        while True:
            ok, frame = cap.read()
            if not ok:
                return
            yield np.ascontiguousarray(frame[:, :, ::-1])
    finally:
        cap.release()
