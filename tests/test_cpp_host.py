"""The example C++ host (scripts/cpp_host): built with CMake + g++, run against the tiny bundle."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from osx.runtime.video import read_video_info

HOST_SRC = Path(__file__).resolve().parents[1] / "scripts" / "cpp_host"
OPTIONS = json.dumps({"num_frames": 17, "height": 32, "width": 32, "steps": 2, "seed": 5, "codec": "mp4v"})


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    missing = [tool for tool in ("cmake", "g++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the C++ host needs {' and '.join(missing)} (apt-get install cmake g++)")
    build = tmp_path_factory.mktemp("cpp_host_build")
    # The interpreter running the tests is the one the host must embed (its venv has osx installed).
    subprocess.run(["cmake", "-S", HOST_SRC, "-B", build, f"-DPython3_EXECUTABLE={sys.executable}",
                    "-DCMAKE_CXX_COMPILER=g++", "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    done = subprocess.run(["cmake", "--build", build], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning" not in done.stdout + done.stderr
    return build / "osx_cpp_host"


def run(host, *args):
    return subprocess.run([host, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_host_generates_an_mp4(host, tiny_bundle, tmp_path):
    out = tmp_path / "host.mp4"
    done = run(host, tiny_bundle, out, "--prompt", "a red fox in the snow", "--options", OPTIONS)
    assert done.returncode == 0, done.stderr
    assert "frames: 17" in done.stdout.splitlines()
    assert read_video_info(out) == (17, 32, 32)
    events = [json.loads(line.removeprefix("progress ")) for line in done.stderr.splitlines() if line.startswith("progress ")]
    assert [(e["phase"], e["step"]) for e in events] == [("text_encoder", 1), ("denoise", 1), ("denoise", 2), ("vae_decode", 1)]


def test_host_cancel_from_its_callback(host, tiny_bundle, tmp_path):
    out = tmp_path / "cancelled.mp4"
    done = run(host, tiny_bundle, out, "--options", OPTIONS, "--cancel-after", 2)
    assert done.returncode == 1
    assert "generate_to_file returned ERR_CANCELLED" in done.stderr
    assert sum(line.startswith("progress ") for line in done.stderr.splitlines()) == 2
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--options", "{oops"], "generate_to_file returned ERR_INVALID_ARGUMENT: options are not valid JSON"),
    (["--options", json.dumps({"num_frames": 3})], "generate_to_file returned ERR_INPUT"),
    (["--open-options", json.dumps({"gpu": 1})], "open_bundle returned ERR_INVALID_ARGUMENT: unknown options ['gpu']"),
])
def test_host_exits_non_zero_on_shim_errors(host, tiny_bundle, tmp_path, args, message):
    done = run(host, tiny_bundle, tmp_path / "x.mp4", *args)
    assert done.returncode == 1 and message in done.stderr


def test_host_missing_bundle(host, tmp_path):
    done = run(host, tmp_path / "nope", tmp_path / "x.mp4")
    assert done.returncode == 1 and "open_bundle returned ERR_BUNDLE" in done.stderr and "does not exist" in done.stderr


def test_host_usage(host):
    assert run(host).returncode == 2
