"""A C-friendly face of the runtime, for hosts that embed CPython (scripts/cpp_host).

Plain arguments (str, int, one JSON options string) and plain results; every function returns an int
status code, results ride along in a tuple. No exception leaves this module.

    handle = open_bundle(bundle_dir, options_json)        -> handle >= 1, or a status < 0
    set_progress_callback(handle, fn_or_None)             -> status
    generate_to_file(handle, prompt, out_path, options)   -> (status, frames written)
    generate_to_buffer(handle, prompt, options)           -> (status, RGB bytes, (frames, height, width, 3))
    cancel(handle)                                        -> status
    close(handle)                                         -> status
    last_error()                                          -> message of this thread's last failed call
    status_name(status)                                   -> "OK", "ERR_BAD_HANDLE", ...

Options (JSON objects; unknown keys are refused):
    open_bundle:  {"backend": "onnxruntime" | "tensorrt", "verify": true}  (verify: check every sha256)
    generate_*:   {"negative_prompt", "num_frames", "height", "width", "fps", "steps", "guidance_scale",
                   "seed"}; generate_to_file also takes "codec" ("auto", "h264", "mp4v", "vp9").
                  Unset keys take the bundle's defaults. An Open-Sora v2.0 bundle takes the same keys: height
                  and width one of its sizes (resolution buckets, e.g. 192 x 336 for 256px 16:9), num_frames 4k+1;
                  also "image", "condition", "video", "guidance_img", and "t2i2v" (true/false; default on for a
                  bundle exported --with-t2i when no reference is given) with "t2i_steps" (the image's, default 50).

Errors: `last_error()` is kept per thread, like errno: it describes the most recent call on the
calling thread that did not return OK (every call clears it first). ERR_INTERNAL means a bug in osx;
its message carries the traceback.

Threads: any function may be called from any thread (holding the GIL, as the C API requires). Calls
on one handle are serialised by that handle's lock: a second generate on a busy handle waits for the
first (the GIL is released while it waits and while the models run, so generations on different
handles overlap). `cancel` and `set_progress_callback` never wait: cancel stops the running
generation between two steps (it then returns ERR_CANCELLED); with none running it does nothing. A
callback is read when a generation starts. `close` cancels a running generation, waits for it, then
frees the handle. Calling generate or close on a handle from inside its own progress callback is
refused (ERR_INVALID_ARGUMENT) rather than deadlocking.

Progress: the callback receives one JSON line (str) per event: {"handle", "phase" ("text_encoder" |
"denoise" | "vae_decode"; with Open-Sora v2.0 also "t2i" and "t2i_decode", t2i2v's image loop and decoder,
and "vae_encode": osx.runtime.progress), "step", "total", "elapsed" (s since the generation started), "eta"
(s the phase still needs)}. It runs on the generating thread. If it raises anything (SystemExit and other
BaseExceptions included), the generation stops with ERR_CALLBACK.
"""

from __future__ import annotations

import functools
import itertools
import json
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from osx.errors import BundleError, InputError, OsxError, os_error

OK = 0
ERR_INVALID_ARGUMENT = -1  # bad JSON (too deep, too long), unknown option, wrong type, a path with NUL, re-entrant call
ERR_BAD_HANDLE = -2        # never opened, or already closed
ERR_BUNDLE = -3            # bundle missing, corrupt, or not runnable here (e.g. engine for another GPU)
ERR_INPUT = -4             # request outside what the bundle supports (frames, size, steps, ...)
ERR_CANCELLED = -5         # cancel() (or close()) stopped the generation
ERR_CALLBACK = -6          # the progress callback raised
ERR_FAILED = -7            # another error the user can act on (e.g. the output file cannot be written)
ERR_INTERNAL = -8          # a bug in osx; last_error() has the traceback

STATUS_NAMES = {v: k for k, v in globals().items() if k == "OK" or k.startswith("ERR_")}
_NUMBER = (int, float)
_OPEN_OPTIONS = {"backend": (str, type(None)), "verify": bool}
_GENERATE_OPTIONS = {"negative_prompt": (str, type(None)), "num_frames": int, "height": int, "width": int, "fps": _NUMBER,
                     "steps": int, "guidance_scale": _NUMBER, "seed": int,
                     "image": (str, type(None)), "condition": str,  # image: head|tail|loop; video: head (v1.2), head|tail|*_easy (v2.0)
                     "video": (str, type(None)), "extend": int,  # a reference video file; append N continuing clips (v1.2)
                     "guidance_img": _NUMBER,  # v2.0's image guidance scale
                     "t2i2v": (bool, type(None)), "t2i_steps": int}  # v2.0's text -> image -> video (first frame by Flux.1-dev)
_FILE_OPTIONS = {**_GENERATE_OPTIONS, "codec": str}
MAX_OPTIONS_CHARS = 1 << 20  # options are a handful of scalars; the prompts inside have their own cap


class _ShimError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class _Session:
    handle: int
    pipeline: Any  # osx.runtime.pipeline.Pipeline (imported lazily: the shim must import even if it cannot)
    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: int | None = None  # thread id running a generation on this handle
    callback: Callable[[str], Any] | None = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)


_sessions: dict[int, _Session] = {}
_sessions_lock = threading.Lock()
_next_handle = itertools.count(1)
_errors = threading.local()


def _error_text(e: BaseException) -> str:
    return f"{e.message}\n  hint: {e.hint}" if isinstance(e, OsxError) and e.hint else getattr(e, "message", str(e))


def _status_of(e: BaseException) -> int:
    from osx.runtime.pipeline import GenerationCancelled

    if isinstance(e, _ShimError):
        return e.status
    if isinstance(e, (GenerationCancelled, KeyboardInterrupt)):
        return ERR_CANCELLED
    for kind, status in ((BundleError, ERR_BUNDLE), (InputError, ERR_INPUT), (OsxError, ERR_FAILED)):
        if isinstance(e, kind):
            return status
    return ERR_INTERNAL


def _shim_call(failure: Callable[[int], Any]):
    """Run the call with this thread's last error cleared; turn any exception into a status (via
    `failure(status)`) and a message for last_error()."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            _errors.message = ""
            try:
                return fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - the promise: nothing leaves the shim, not even SystemExit
                e = os_error(e) if isinstance(e, OSError) else e  # a full disk: ERR_FAILED with a hint
                status = _status_of(e)
                _errors.message = traceback.format_exc() if status == ERR_INTERNAL else _error_text(e)
                return failure(status)

        return call

    return wrap


def _parse_options(options_json: str, allowed: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    if not isinstance(options_json, str):
        raise _ShimError(ERR_INVALID_ARGUMENT, f"options must be a JSON string, got {type(options_json).__name__}")
    if len(options_json) > MAX_OPTIONS_CHARS:
        raise _ShimError(ERR_INVALID_ARGUMENT, f"options are {len(options_json)} characters; at most {MAX_OPTIONS_CHARS} are accepted")
    try:
        options = json.loads(options_json or "{}")
    except (ValueError, RecursionError) as e:  # bad JSON, nesting too deep, an integer over Python's digit limit
        raise _ShimError(ERR_INVALID_ARGUMENT, f"options are not valid JSON: {str(e)[:200]}") from None
    if not isinstance(options, dict):
        raise _ShimError(ERR_INVALID_ARGUMENT, f"options must be a JSON object, got {type(options).__name__}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise _ShimError(ERR_INVALID_ARGUMENT, f"unknown options {unknown}; allowed: {list(allowed)}")
    for key, value in options.items():
        kinds = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "a number" if kinds == _NUMBER else " or ".join(
                {int: "an integer", str: "a string", bool: "true or false", type(None): "null"}[k] for k in kinds)
            raise _ShimError(ERR_INVALID_ARGUMENT, f"option {key!r} must be {names}, got {json.dumps(value)}")
    return options


def _session(handle: int) -> _Session:
    with _sessions_lock:
        session = _sessions.get(handle) if isinstance(handle, int) and not isinstance(handle, bool) else None
    if session is None:
        raise _ShimError(ERR_BAD_HANDLE, f"handle {handle!r} is not open")
    return session


def _check_text(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, str):
            raise _ShimError(ERR_INVALID_ARGUMENT, f"{name} must be a string, got {type(value).__name__}")


def _check_path(**paths: Any) -> None:
    """Strings the OS can take as a path: checked before any work, so a bad one costs no generation."""
    _check_text(**paths)
    for name, value in paths.items():
        if "\0" in value or not value:
            raise _ShimError(ERR_INVALID_ARGUMENT, f"{name} {value!r} " + ("contains a NUL byte" if value else "is empty"))


class _Running:
    """Hold a handle's lock for one generation, refusing re-entry from its own callback."""

    def __init__(self, session: _Session):
        self.session = session

    def __enter__(self) -> _Session:
        if self.session.owner == threading.get_ident():
            raise _ShimError(ERR_INVALID_ARGUMENT, f"handle {self.session.handle} is generating on this thread "
                                                   "(called from its own progress callback?)")
        self.session.lock.acquire()
        with _sessions_lock:  # atomic with close(): either close sees us running, or we see it closed
            still_open = _sessions.get(self.session.handle) is self.session
            if still_open:
                self.session.owner = threading.get_ident()
                self.session.cancel_requested.clear()  # a cancel() before this generation began is not for it
        if not still_open:
            self.session.lock.release()
            raise _ShimError(ERR_BAD_HANDLE, f"handle {self.session.handle} was closed")
        return self.session

    def __exit__(self, *exc) -> None:
        self.session.owner = None
        self.session.lock.release()


# --- the functions ---------------------------------------------------------------------------------


@_shim_call(failure=lambda status: status)
def open_bundle(bundle_path: str, options_json: str = "{}") -> int:
    """Open a bundle folder. Returns a handle (>= 1) or a status (< 0)."""
    from osx.runtime.pipeline import Pipeline

    _check_path(bundle_path=bundle_path)
    options = _parse_options(options_json, _OPEN_OPTIONS)
    pipeline = Pipeline.load(bundle_path, options.get("backend"), verify=bool(options.get("verify", True)))
    with _sessions_lock:
        handle = next(_next_handle)
        _sessions[handle] = _Session(handle, pipeline)
    return handle


@_shim_call(failure=lambda status: status)
def set_progress_callback(handle: int, callback: Callable[[str], Any] | None) -> int:
    """Register `callback(json_line)` for the handle's progress events (None removes it)."""
    if callback is not None and not callable(callback):
        raise _ShimError(ERR_INVALID_ARGUMENT, f"callback must be callable or None, got {type(callback).__name__}")
    _session(handle).callback = callback
    return OK


def _generate(session: _Session, prompt: str, options: dict[str, Any]):
    """(frames uint8 [F, H, W, 3], request) with the session's lock held by the caller."""
    callback = session.callback
    failed: list[BaseException] = []

    def progress(event: dict) -> bool:
        """Called by the pipeline after every step; returning False stops it before the next one."""
        if callback is not None:
            line = json.dumps({"handle": session.handle, **{k: round(v, 3) if isinstance(v, float) else v for k, v in event.items()}})
            try:
                callback(line)
            except BaseException as e:  # noqa: BLE001 - whatever the host's callback raised (SystemExit too), stop cleanly
                failed.append(e)
                return False
        return not session.cancel_requested.is_set()

    pipeline = session.pipeline
    refs = {k: options.pop(k) for k in ("image", "condition", "video", "extend") if k in options}
    _check_path(**{k: refs[k] for k in ("image", "video") if refs.get(k) is not None})
    request = pipeline.prepare_request(prompt, **options)  # checked before any work; gives the resolved fps
    try:
        frames = pipeline.run(request, progress=progress, **refs)
    except Exception:
        if failed:
            raise _ShimError(ERR_CALLBACK, f"the progress callback raised {failed[0]!r}") from None
        raise
    return frames, request


@_shim_call(failure=lambda status: (status, 0))
def generate_to_file(handle: int, prompt: str, out_path: str, options_json: str = "{}") -> tuple[int, int]:
    """Generate one video into `out_path` (.mp4 / .webm). Returns (status, number of frames written)."""
    from osx.runtime.video import check_writable, write_video

    _check_text(prompt=prompt)
    _check_path(out_path=out_path)
    options = _parse_options(options_json, _FILE_OPTIONS)
    codec = options.pop("codec", "auto")
    check_writable(out_path, codec)  # fail before the compute, not after
    with _Running(_session(handle)) as session:
        frames, request = _generate(session, prompt, options)
        write_video(frames, out_path, request.fps, codec)
    return OK, len(frames)


@_shim_call(failure=lambda status: (status, b"", ()))
def generate_to_buffer(handle: int, prompt: str, options_json: str = "{}") -> tuple[int, bytes, tuple[int, ...]]:
    """Generate one video into memory. Returns (status, RGB bytes, shape): the bytes are uint8
    [frames, height, width, 3], C order; on failure (status, b"", ())."""
    _check_text(prompt=prompt)
    options = _parse_options(options_json, _GENERATE_OPTIONS)
    with _Running(_session(handle)) as session:
        frames, _ = _generate(session, prompt, options)
    return OK, frames.tobytes(), tuple(int(n) for n in frames.shape)


@_shim_call(failure=lambda status: status)
def cancel(handle: int) -> int:
    """Stop the handle's running generation at the next step boundary (it returns ERR_CANCELLED)."""
    _session(handle).cancel_requested.set()
    return OK


@_shim_call(failure=lambda status: status)
def close(handle: int) -> int:
    """Cancel any running generation, wait for it, release the models and forget the handle."""
    session = _session(handle)
    if session.owner == threading.get_ident():
        raise _ShimError(ERR_INVALID_ARGUMENT, f"handle {handle} cannot be closed from its own progress callback")
    with _sessions_lock:  # from here no call can start on the handle
        if _sessions.get(handle) is not session:
            raise _ShimError(ERR_BAD_HANDLE, f"handle {handle} was closed")
        del _sessions[handle]
        session.cancel_requested.set()
    with session.lock:  # wait for a running generation to stop
        session.pipeline.release()
    return OK


def last_error() -> str:
    """Why this thread's most recent shim call did not return OK ("" if it did)."""
    return getattr(_errors, "message", "")


def status_name(status: int) -> str:
    """The name of a status code; "UNKNOWN(...)" for anything else (never raises)."""
    if isinstance(status, int) and not isinstance(status, bool) and status in STATUS_NAMES:
        return STATUS_NAMES[status]
    return f"UNKNOWN({str(status)[:40] if isinstance(status, (int, float, str)) else type(status).__name__})"
