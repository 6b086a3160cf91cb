"""A component exported in a process of its own (osx.export.component_process): the same bundle as in one
process, byte for byte, and a failing child reported as what it was, with nothing half-written."""

import errno
import json
import os
import signal

import pytest

from osx.bundle import Bundle
from osx.errors import OsxError, ValidationError
from osx.export.component_process import in_child_process

pytest.importorskip("torch", reason="exporting needs the `export` extra")

TIMINGS = {"export_seconds"}  # the only manifest fields that may differ between two runs


def test_own_process_export_is_byte_identical(tiny_bundle, tmp_path):
    """The session's tiny bundle (every component in the test process) against the text encoder (graph, the
    graph fused for onnxruntime, tokenizer) exported in a process of its own: every file's sha256 and the
    component's manifest entry but its timing. One component keeps the test short: each runs the same way."""
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    lines = []
    out = tmp_path / "own"
    export_bundle(ExportRequest("opensora-v1.2-tiny", out, RANDOM_WEIGHTS, gpu="cpu", only=("text_encoder",), own_process=True,
                                progress=lines.append))
    ours, theirs = Bundle.open(out).manifest, Bundle.open(tiny_bundle).manifest
    assert {"text_encoder.onnx", "text_encoder.ort.onnx", "tokenizer.json"} <= set(ours.files)
    assert {k: f.sha256 for k, f in ours.files.items()} == {k: theirs.files[k].sha256 for k in ours.files}
    entries = [{k: v for k, v in json.loads(json.dumps(m.components["text_encoder"].to_dict())).items() if k not in TIMINGS}
               for m in (ours, theirs)]
    assert entries[0] == entries[1]
    # the child's progress came back through the parent, with its peak, which the manifest records
    assert any("text_encoder: exporting in a process of its own" in line for line in lines)
    assert any("text_encoder: done; the component's process peaked at" in line for line in lines)
    assert any("max rel" in line for line in lines)  # the validation table, shown by the parent
    assert 10 * 2**20 < ours.export["process_peak_rss_bytes"]["text_encoder"] < 2**32


# --- failures in the child (module-level functions: the spawned child imports them from this file) ---

def _invalid(say, show):
    say("about to fail")
    error = ValidationError("denoiser: ONNX output 'v' differs from PyTorch", hint="report it")
    error.rows = [{"output": "v", "ok": False}]
    raise error


def _disk_full(say, show):
    raise OSError(errno.ENOSPC, "No space left on device", "/out/denoiser.onnx.data")


def _bug(say, show):
    return {}["missing"]


def _killed(say, show):
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would


def _fine(x, say, show):
    show("table")
    return {"x": x}


def test_child_result_progress_and_peak():
    said, shown = [], []
    result = in_child_process(_fine, {"x": 3}, say=said.append, show=shown.append, what="vae_decoder")
    assert result["x"] == 3 and shown == ["table"] and said == []
    assert 10 * 2**20 < result["peak_rss_bytes"] < 2**32  # the child's own peak resident set, in bytes


def test_child_failures_come_back_as_what_they_were():
    said = []
    with pytest.raises(ValidationError) as e:
        in_child_process(_invalid, {}, say=said.append, show=print, what="denoiser")
    assert said == ["about to fail"] and e.value.hint == "report it" and e.value.rows == [{"output": "v", "ok": False}]
    assert e.value.exit_code == 2 and "differs from PyTorch" in e.value.message

    with pytest.raises(OSError) as e:
        in_child_process(_disk_full, {}, say=print, show=print, what="denoiser")
    assert e.value.errno == errno.ENOSPC and e.value.filename == "/out/denoiser.onnx.data"

    with pytest.raises(RuntimeError, match=r"denoiser: the export process failed with KeyError: 'missing'") as e:
        in_child_process(_bug, {}, say=print, show=print, what="denoiser")
    assert "in _bug" in str(e.value)  # the child's traceback comes with it

    with pytest.raises(OsxError, match=r"denoiser: the export process was killed by SIGKILL \(out of memory\?\)"):
        in_child_process(_killed, {}, say=print, show=print, what="denoiser")
