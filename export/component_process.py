"""One component's export in a process of its own, so its memory goes back to the OS before the next one.

    entry = in_child_process(fn, kwargs, say=..., show=...)   # fn(**kwargs, say=..., show=...) in a fresh process

A Python process does not hand freed memory back reliably (allocator arenas, torch's and onnxruntime's
caches): measured, the real-size v1.2 export in one process peaked at 4.76 GB in the VAE phase, which
alone peaks at 3.49 GB, because the STDiT3's validation left its memory resident. A spawned child starts
clean and ends with its component, so each component's peak is its own (plus this process, which holds
the imports and nothing large meanwhile).

The child's progress lines come back through a pipe and are shown here as they arrive. Its failure is
raised here as what it was: an OsxError (exit 2 in the CLI) or OSError (full disk, ...) as itself, any
other error as a RuntimeError carrying the child's traceback, a child killed by a signal (the kernel's
out-of-memory killer sends SIGKILL) as an OsxError saying so. Files are written as in one process (into
the bundle's temporary folder); the caller's BundleWriter removes them on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import resource
import signal
import threading
import time
import traceback
from typing import Callable

from osx.errors import OsxError


def in_child_process(fn: Callable[..., dict], kwargs: dict, *, say: Callable[[str], None], show: Callable[[str], None],
                     what: str) -> dict:
    """`fn(**kwargs, say=, show=)` run in a spawned process (fn and kwargs must pickle); returns its result,
    a dict, with `peak_rss_bytes`: the child's own peak resident set (getrusage, after the work)."""
    release_memory()  # what this process holds while it waits: its imports, little else
    ctx = multiprocessing.get_context("spawn")  # never fork a process holding torch's threads
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, fn, kwargs), name=f"osx-export-{what}", daemon=True)
    child.start()
    send.close()  # the child holds the only writing end: EOF here when it exits
    result = failure = None
    try:
        while True:
            try:
                kind, payload = receive.recv()
            except EOFError:
                break
            if kind == "say":
                say(payload)
            elif kind == "show":
                show(payload)
            elif kind == "done":
                result = payload
            else:
                failure = payload
        child.join()
    finally:
        if child.is_alive():  # interrupted here (Ctrl-C): do not leave the child running
            child.terminate()
            child.join()
        receive.close()
    if failure is not None:
        raise _rebuilt(failure, what)
    if result is None:
        code = child.exitcode
        cause = (f"was killed by {signal.Signals(-code).name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
                 if code is not None and code < 0 else f"exited with status {code} without a result")
        raise OsxError(f"{what}: the export process {cause}",
                       hint="check free memory (README \"Exporting a real checkpoint\" says how much a component needs)")
    return result


def release_memory() -> None:
    """Collect garbage and hand the allocator's free memory back to the OS (glibc keeps freed chunks below
    its mmap threshold, which grows to 32 MB as large tensors are freed: most of a model's weights)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _child(send, fn, kwargs) -> None:
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        result = fn(**kwargs, say=lambda m: send.send(("say", m)), show=lambda m: send.send(("show", m)))
        send.send(("done", {**result, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which raises it
        send.send(("error", _portable(e)))
    finally:
        send.close()


def _exit_with_parent(parent: int) -> None:
    """Killed parents leave orphans: end this child once its parent is gone (it is re-parented)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _portable(e: BaseException) -> tuple:
    """What the parent needs to raise `e` again (exceptions with their own __init__ do not all unpickle)."""
    if isinstance(e, KeyboardInterrupt):  # Ctrl-C reaches the whole process group: the parent's own ends the export
        return ("interrupt",)
    if isinstance(e, OsxError):  # with its attributes (a ValidationError's table rows)
        return ("osx", type(e), e.message, e.hint, {k: v for k, v in vars(e).items() if k not in ("message", "hint")})
    if isinstance(e, OSError) and e.errno is not None:
        return ("os", e.errno, e.strerror, e.filename)
    return ("other", f"{type(e).__name__}: {e}", traceback.format_exc())


def _rebuilt(failure: tuple, what: str) -> BaseException:
    kind, *rest = failure
    if kind == "interrupt":
        return KeyboardInterrupt()
    if kind == "osx":
        cls, message, hint, attributes = rest
        error = cls(message, hint=hint)
        error.__dict__.update(attributes)
        return error
    if kind == "os":
        return OSError(*rest)
    return RuntimeError(f"{what}: the export process failed with {rest[0]}\n--- its traceback ---\n{rest[1]}")
