"""Issue #18 items 2 and 3: the shim's promise (no exception leaves it, bad options are
ERR_INVALID_ARGUMENT) holds for hostile callbacks, options and paths."""

import json

import pytest

from osx.runtime import shim
from test_shim import handle, opts  # noqa: F401 - handle is a fixture


class HostBug(BaseException):
    """Not an Exception: what a careless host (or a binding) may raise."""


@pytest.mark.parametrize("raised", [SystemExit(3), GeneratorExit(), KeyboardInterrupt(), HostBug("boom")])
def test_callback_raising_any_base_exception_stays_inside(handle, raised):
    def on_event(line):
        raise raised

    shim.set_progress_callback(handle, on_event)
    try:
        status, data, shape = shim.generate_to_buffer(handle, "x", opts())
        error = shim.last_error()
    finally:
        shim.set_progress_callback(handle, None)
    assert (status, data, shape) == (shim.ERR_CALLBACK, b"", ()) and type(raised).__name__ in error
    assert shim.generate_to_buffer(handle, "x", opts())[0] == shim.OK  # the handle still works


@pytest.mark.parametrize("status", [[], {}, None, "OK", 1.5, -4.0, 10**100])
def test_status_name_never_raises(status):
    assert shim.status_name(status).startswith("UNKNOWN")


@pytest.mark.parametrize("options", [
    "[" * 100_000 + "]" * 100_000,                # deep nesting: RecursionError inside json
    '{"seed": 1' + "0" * 5000 + "}",              # over Python's int-digits limit: ValueError inside json
    '{"negative_prompt": "' + "x" * (2 << 20) + '"}',  # an options string over the size cap
], ids=["deep", "digits", "size"])
def test_hostile_options_are_invalid_arguments(handle, options):
    status, _, _ = shim.generate_to_buffer(handle, "x", options)
    assert status == shim.ERR_INVALID_ARGUMENT, shim.last_error()
    assert "Traceback" not in shim.last_error()


def test_open_options_hostile_too(tiny_bundle):
    assert shim.open_bundle(str(tiny_bundle), "[" * 100_000) == shim.ERR_INVALID_ARGUMENT


@pytest.mark.parametrize("options", [{"steps": 10**4000}, {"fps": 10**4000}, {"guidance_scale": 10**4000},
                                     {"num_frames": 10**4000}, {"height": -10**4000}], ids=lambda o: next(iter(o)))
def test_huge_numbers_are_input_errors(handle, options):
    status, _, _ = shim.generate_to_buffer(handle, "x", json.dumps(options))
    assert status == shim.ERR_INPUT, shim.last_error()


def test_nul_in_output_path_fails_before_compute_and_writes_nothing(handle, tmp_path):
    seen = []
    shim.set_progress_callback(handle, seen.append)
    try:
        status, frames = shim.generate_to_file(handle, "x", str(tmp_path / "a\0b.mp4"), opts(codec="mp4v"))
        error = shim.last_error()
    finally:
        shim.set_progress_callback(handle, None)
    assert (status, frames) == (shim.ERR_INVALID_ARGUMENT, 0) and "NUL" in error
    assert seen == [] and list(tmp_path.iterdir()) == []


def test_nul_in_bundle_path(tiny_bundle):
    assert shim.open_bundle(str(tiny_bundle) + "\0x", "{}") == shim.ERR_INVALID_ARGUMENT


def test_check_writable_refuses_nul_for_python_callers(tmp_path):
    from osx.errors import OsxError
    from osx.runtime.video import check_writable

    with pytest.raises(OsxError, match="NUL byte"):
        check_writable(str(tmp_path / "a\0b.mp4"), "mp4v")
