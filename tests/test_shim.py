"""osx.runtime.shim from Python: status codes, last_error, options, handles, progress, cancel, threads."""

import json
import shutil
import threading

import numpy as np
import pytest

from osx.runtime import shim
from osx.runtime.pipeline import Pipeline
from osx.runtime.video import read_video_info

# Small and quick: 17 frames (one VAE chunk), 32x32 px, 2 steps.
FAST = {"num_frames": 17, "height": 32, "width": 32, "steps": 2, "seed": 3}


def opts(**extra):
    return json.dumps({**FAST, **extra})


@pytest.fixture(scope="module")
def handle(tiny_bundle):
    h = shim.open_bundle(str(tiny_bundle), "{}")
    assert h >= 1, shim.last_error()
    yield h
    shim.close(h)


@pytest.fixture
def events(handle):
    """JSON lines the handle's progress callback receives during one test."""
    got = []
    assert shim.set_progress_callback(handle, got.append) == shim.OK
    yield got
    shim.set_progress_callback(handle, None)


def test_buffer_matches_the_pipeline(tiny_bundle, handle):
    status, data, shape = shim.generate_to_buffer(handle, "a red fox", opts())
    assert status == shim.OK and shim.last_error() == ""
    assert shape == (17, 32, 32, 3) and len(data) == np.prod(shape)
    direct = Pipeline.load(tiny_bundle).generate("a red fox", **FAST)  # the same request without the shim
    np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(shape), direct)


def test_file_and_progress_events(handle, events, tmp_path):
    out = tmp_path / "clip.mp4"
    status, frames = shim.generate_to_file(handle, "a red fox", str(out), opts(codec="mp4v"))
    assert (status, frames) == (shim.OK, 17), shim.last_error()
    assert read_video_info(out) == (17, 32, 32)
    parsed = [json.loads(line) for line in events]
    assert all(set(e) == {"handle", "phase", "step", "total", "elapsed", "eta"} and e["handle"] == handle for e in parsed)
    assert [(e["phase"], e["step"], e["total"]) for e in parsed] == [
        ("text_encoder", 1, 1), ("denoise", 1, 2), ("denoise", 2, 2), ("vae_decode", 1, 1)]
    elapsed = [e["elapsed"] for e in parsed]
    assert elapsed == sorted(elapsed) and all(e["eta"] >= 0 for e in parsed)


@pytest.mark.parametrize("options,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"stepz": 3}', "unknown options ['stepz']"),
    (None, "must be a JSON string"),
])
def test_bad_options(handle, options, message):
    status, data, shape = shim.generate_to_buffer(handle, "a fox", options)
    assert (status, data, shape) == (shim.ERR_INVALID_ARGUMENT, b"", ())
    assert message in shim.last_error()
    assert shim.open_bundle("/anywhere", options) == shim.ERR_INVALID_ARGUMENT and message in shim.last_error()


@pytest.mark.parametrize("options,message", [
    ('{"steps": "many"}', "option 'steps' must be an integer, got \"many\""),
    ('{"num_frames": true}', "option 'num_frames' must be an integer, got true"),
    ('{"guidance_scale": [7]}', "option 'guidance_scale' must be a number, got [7]"),
    ('{"negative_prompt": 3}', "option 'negative_prompt' must be a string or null, got 3"),
])
def test_option_types(handle, options, message):
    assert shim.generate_to_buffer(handle, "a fox", options)[0] == shim.ERR_INVALID_ARGUMENT
    assert message in shim.last_error()


def test_bad_handles(tiny_bundle):
    for bad in (0, 9999, -3, True, "1", None):
        assert shim.generate_to_file(bad, "x", "/tmp/x.mp4", "{}") == (shim.ERR_BAD_HANDLE, 0)
        assert "is not open" in shim.last_error()
        assert shim.cancel(bad) == shim.ERR_BAD_HANDLE
        assert shim.set_progress_callback(bad, None) == shim.ERR_BAD_HANDLE
        assert shim.close(bad) == shim.ERR_BAD_HANDLE
    h = shim.open_bundle(str(tiny_bundle), '{"verify": false}')
    assert shim.close(h) == shim.OK
    assert shim.close(h) == shim.ERR_BAD_HANDLE  # closed handles stay invalid
    assert shim.generate_to_buffer(h, "x", "{}")[0] == shim.ERR_BAD_HANDLE


def test_bundle_and_input_errors(tiny_bundle, tmp_path, handle, events):
    assert shim.open_bundle(str(tmp_path / "missing"), "{}") == shim.ERR_BUNDLE
    assert "does not exist" in shim.last_error()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "tokenizer.json").write_text("{}")
    assert shim.open_bundle(str(broken), "{}") == shim.ERR_BUNDLE and "tokenizer.json" in shim.last_error()
    status, _ = shim.generate_to_file(handle, "x", str(tmp_path / "x.mp4"), opts(num_frames=5))
    assert status == shim.ERR_INPUT and "5 frames" in shim.last_error()
    status, _ = shim.generate_to_file(handle, "x", str(tmp_path / "no" / "such" / "dir.mp4"), opts())
    assert status == shim.ERR_FAILED and "does not exist" in shim.last_error()
    assert events == []  # both refused before any compute
    assert shim.generate_to_file(handle, 42, str(tmp_path / "x.mp4"), opts()) == (shim.ERR_INVALID_ARGUMENT, 0)
    assert shim.status_name(shim.ERR_INPUT) == "ERR_INPUT" and shim.status_name(123) == "UNKNOWN(123)"


def test_cancel_from_the_callback_then_reuse(handle):
    seen = []

    def on_event(line):
        seen.append(json.loads(line))
        if seen[-1]["phase"] == "denoise":
            assert shim.cancel(handle) == shim.OK

    shim.set_progress_callback(handle, on_event)
    status, data, shape = shim.generate_to_buffer(handle, "a fox", opts(steps=4))
    assert (status, data, shape) == (shim.ERR_CANCELLED, b"", ())
    assert "cancelled" in shim.last_error()
    assert [(e["phase"], e["step"]) for e in seen] == [("text_encoder", 1), ("denoise", 1)]  # stopped between steps
    shim.set_progress_callback(handle, None)
    assert shim.generate_to_buffer(handle, "a fox", opts())[0] == shim.OK  # the handle still works


def test_cancel_from_another_thread(handle):
    at_step, cancelled = threading.Event(), threading.Event()
    result = {}

    def on_event(line):
        if json.loads(line)["phase"] == "denoise":
            at_step.set()
            cancelled.wait(timeout=30)  # hold the generation here until the other thread has cancelled

    shim.set_progress_callback(handle, on_event)
    worker = threading.Thread(target=lambda: result.update(r=shim.generate_to_buffer(handle, "x", opts(steps=5))))
    worker.start()
    assert at_step.wait(timeout=60)
    assert shim.cancel(handle) == shim.OK
    cancelled.set()
    worker.join()
    shim.set_progress_callback(handle, None)
    assert result["r"][0] == shim.ERR_CANCELLED


def test_callback_that_raises(handle):
    def on_event(line):
        raise RuntimeError("host is unhappy")

    shim.set_progress_callback(handle, on_event)
    status, _, _ = shim.generate_to_buffer(handle, "x", opts())
    assert status == shim.ERR_CALLBACK and "host is unhappy" in shim.last_error()
    shim.set_progress_callback(handle, None)


def test_reentrant_call_from_callback_is_refused(handle):
    inner = []

    def on_event(line):
        if not inner:
            inner.append(shim.generate_to_buffer(handle, "x", opts())[0])
            inner.append(shim.close(handle))

    shim.set_progress_callback(handle, on_event)
    status = shim.generate_to_buffer(handle, "x", opts())[0]
    shim.set_progress_callback(handle, None)
    assert status == shim.OK and inner == [shim.ERR_INVALID_ARGUMENT, shim.ERR_INVALID_ARGUMENT]


def test_one_handle_serialises_threads(handle):
    log, lock = [], threading.Lock()
    results = {}

    def on_event(line):
        with lock:
            log.append(threading.get_ident())

    def work(k):
        results[k] = shim.generate_to_buffer(handle, "a fox", opts())

    shim.set_progress_callback(handle, on_event)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shim.set_progress_callback(handle, None)
    assert [r[0] for r in results.values()] == [shim.OK, shim.OK]
    assert results[0][1] == results[1][1]
    # each generation's 4 events are contiguous: the second waited for the first
    runs = [log[i] for i in range(len(log)) if i == 0 or log[i] != log[i - 1]]
    assert len(log) == 8 and len(runs) == 2


def test_last_error_is_per_thread(handle):
    assert shim.generate_to_buffer(handle, "x", "{bad")[0] == shim.ERR_INVALID_ARGUMENT
    other = {}
    t = threading.Thread(target=lambda: other.update(before=shim.last_error(), status=shim.cancel(12345), after=shim.last_error()))
    t.start()
    t.join()
    assert other["before"] == "" and other["status"] == shim.ERR_BAD_HANDLE and "12345" in other["after"]
    assert "not valid JSON" in shim.last_error()  # this thread's error is untouched
    assert shim.cancel(handle) == shim.OK and shim.last_error() == ""  # a successful call clears it


def test_close_cancels_a_running_generation(tiny_bundle):
    h = shim.open_bundle(str(tiny_bundle), '{"verify": false}')
    at_step, result = threading.Event(), {}

    def on_event(line):
        if json.loads(line)["phase"] == "denoise":
            at_step.set()
            for _ in range(6000):  # close() first forgets the handle, then waits for this generation to stop
                if h not in shim._sessions:
                    break
                closer.join(timeout=0.01)

    closer = threading.Thread(target=lambda: (at_step.wait(timeout=60), result.update(close=shim.close(h))))
    shim.set_progress_callback(h, on_event)
    closer.start()
    result["generate"] = shim.generate_to_buffer(h, "x", opts(steps=5))[0]
    closer.join()
    assert result == {"generate": shim.ERR_CANCELLED, "close": shim.OK}
