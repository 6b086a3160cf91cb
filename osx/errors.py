"""Errors a user can act on. The CLI prints them without a traceback and exits with `exit_code`."""


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
