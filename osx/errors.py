"""Errors a user can act on. The CLI prints them without a traceback and exits with `exit_code`."""

import errno


class OsxError(Exception):
    """Something the user can fix: says what was wrong, what is allowed, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class BundleError(OsxError):
    """A bundle is missing, corrupt, or does not match this machine."""


class CheckpointError(OsxError):
    """A checkpoint cannot be loaded into the model (missing / unexpected / wrong-shape keys)."""


class ValidationError(OsxError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""


class InputError(OsxError):
    """A generation request outside what the bundle supports."""


# --- turning environment failures into OsxErrors (the CLI's last line of defence) ---------------------

# Optional modules -> the pyproject extra that installs them (README "Set up").
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "onnx", "onnxscript", "onnxslim", "transformers", "diffusers", "safetensors",
                     "sentencepiece", "polygraphy", "onnx_graphsurgeon", "matplotlib", "google"), "export"),
    "av": "h264", "tensorrt": "tensorrt", "tensorrt_lean": "tensorrt", "tensorrt_dispatch": "tensorrt",
    "cuda": "tensorrt", "pynvml": "tensorrt", "modelopt": "modelopt", "ray": "serve",
}


def missing_module_error(e: ModuleNotFoundError) -> OsxError:
    top = (e.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return OsxError(f"Python module {top or e!s} is not installed", hint="reinstall osx from its clone: pip install -e .")
    return OsxError(f"this needs the `{extra}` extra: Python module {top!r} is not installed",
                    hint=f'from the osx clone: pip install -e ".[{extra}]"'
                    + (" (torch from the CPU index first; README \"Set up\")" if extra == "export" else ""))


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "your disk quota is used up: free some space or write somewhere else",
    errno.EROFS: "that file system is read-only: write somewhere else",
    errno.EACCES: "permission denied: write somewhere you may write, or fix the permissions",
    errno.EPERM: "operation not permitted: write somewhere you may write, or fix the permissions",
    errno.ENOENT: "check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error(e: OSError) -> OsxError:
    """A full disk, a read-only folder, ... as a message: what failed, where, and what to do.
    (Writers clean up their temporary files themselves, so nothing half-written is left.)"""
    where = f": {e.filename}" if e.filename else ""
    what = e.strerror or str(e) or type(e).__name__
    return OsxError(f"{what}{where}", hint=_OS_HINTS.get(e.errno, "check the path, the disk and its permissions"))
