"""`osx generate` end to end, in subprocesses: torch made unimportable, outputs read back, bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from no_torch import CLI, run_without_torch
from osx.runtime.video import read_video_info

def osx(*args, torch_free=True):
    """The CLI in a subprocess; torch_free: with torch unimportable (tests/no_torch.py)."""
    if torch_free:
        return run_without_torch(CLI, *args)
    return subprocess.run([sys.executable, "-m", "osx", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": ""})


def test_generate_without_torch_writes_mp4_and_preview(tiny_bundle, tmp_path):
    out, preview = tmp_path / "clip.mp4", tmp_path / "sheet.png"
    r = osx("generate", tiny_bundle, "--prompt", "a red fox in the snow", "--out", out, "--preview", preview,
            "--steps", "3", "--frames", "34", "--resolution", "64x48", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert read_video_info(out) == (34, 48, 64)
    assert preview.stat().st_size > 0
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}: 34 frames, 64x48, 24 fps") and "seed 7" in last
    assert "it/s" in r.stderr  # the denoising progress bar


def test_progress_json_and_webm(tiny_bundle, tmp_path):
    out = tmp_path / "clip.webm"
    r = osx("generate", tiny_bundle, "--prompt", "waves on a beach", "--out", out, "--steps", "2", "--frames", "17",
            "--progress-json")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["phase"] for e in events if e["event"] == "progress"] == ["text_encoder", "denoise", "denoise", "vae_decode"]
    done = events[-1]
    assert done["event"] == "done" and done["codec"] == "vp9" and done["frames"] == 17
    assert read_video_info(out) == (17, 64, 64)


def test_empty_and_long_prompts_warn(tiny_bundle, tmp_path):
    r = osx("generate", tiny_bundle, "--prompt", "", "--out", tmp_path / "a.mp4", "--steps", "1", "--frames", "17")
    assert r.returncode == 0 and "warning: empty prompt" in r.stderr
    r = osx("generate", tiny_bundle, "--prompt", "snow " * 40, "--out", tmp_path / "b.mp4", "--steps", "1", "--frames", "17")
    m = re.search(r"warning: the prompt has (\d+) tokens; the text encoder takes 32, so the last (\d+) are dropped", r.stderr)
    assert r.returncode == 0 and m and int(m.group(1)) - 32 == int(m.group(2)) > 0


def test_bad_input_exit_2_with_clear_errors(tiny_bundle, tmp_path):
    r = osx("generate", tmp_path / "missing", "--prompt", "x", "--out", tmp_path / "a.mp4")
    assert r.returncode == 2 and "error: bundle" in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_bundle, corrupt)
    (corrupt / "tokenizer.json").write_text("{}")
    r = osx("generate", corrupt, "--prompt", "x", "--out", tmp_path / "a.mp4")
    assert r.returncode == 2 and "tokenizer.json" in r.stderr and "Traceback" not in r.stderr

    r = osx("generate", tiny_bundle, "--prompt", "x", "--out", tmp_path / "a.mp4", "--resolution", "854x480")
    assert r.returncode == 2 and "854x480 (WxH): outside what this bundle supports" in r.stderr
    assert "width 16..128 px, height 16..128 px" in r.stderr and "frames 1, 17..51" in r.stderr

    r = osx("generate", tiny_bundle, "--prompt", "x", "--out", tmp_path / "a.mp4", "--frames", "100")
    assert r.returncode == 2 and "100 frames: outside" in r.stderr

    r = osx("generate", tiny_bundle, "--prompt", "x", "--out", tmp_path / "a.mp4", "--resolution", "64by64")
    assert r.returncode == 2 and "WIDTHxHEIGHT" in r.stderr
    assert not (tmp_path / "a.mp4").exists()


def test_unwritable_output_fails_before_the_bundle_is_touched(tmp_path):
    # The bundle does not exist either: the error is about the output, so nothing was loaded or computed.
    for out, message in [(tmp_path / "no" / "such" / "dir" / "a.mp4", "does not exist"),
                         (tmp_path / "a.avi", "not '.avi'")]:
        r = osx("generate", tmp_path / "missing-bundle", "--prompt", "x", "--out", out)
        assert r.returncode == 2 and message in r.stderr and "bundle" not in r.stderr.split("hint")[0]
    r = osx("generate", tmp_path / "missing-bundle", "--prompt", "x", "--out", tmp_path / "a.mp4", "--preview", tmp_path / "p.jpg")
    assert r.returncode == 2 and "expected a .png" in r.stderr
