"""Issue #18 item 8: every numeric option is bounded (by the bundle or a documented limit), and a
generation that turns NaN / inf stops naming the stage instead of writing a garbage video."""

import numpy as np
import pytest

from osx.errors import InputError, OsxError
from osx.runtime.pipeline import Pipeline
from osx.runtime.request import MAX_GUIDANCE_SCALE
from test_bundle_cli import run

FAST = {"num_frames": 17, "height": 32, "width": 32, "steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return Pipeline.load(tiny_bundle, verify=False)


@pytest.mark.parametrize("option,value,message", [
    ("steps", 100_000, "steps=100000 is outside 1..1000"),
    ("steps", 0, "steps=0 is outside 1..1000"),
    ("guidance_scale", 1e308, f"outside [0, {MAX_GUIDANCE_SCALE:g}]"),
    ("guidance_scale", float("nan"), "guidance scale=nan"),
    ("guidance_scale", -1.0, "guidance scale=-1.0"),
    ("fps", float("inf"), "fps=inf"),
    pytest.param("fps", 10**400, "fps=", id="fps-10**400"),
    ("seed", -1, "seed=-1 is outside"),
    ("seed", 2**63, "seed="),
    pytest.param("num_frames", 10**4000, "far outside", id="frames-10**4000"),
    ("height", 1.5, "not a whole number"),
    ("width", "64", "not a whole number"),
    ("steps", True, "not a whole number"),
])
def test_out_of_range_options_are_input_errors(pipe, option, value, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        pipe.prepare_request("x", **{**FAST, option: value})


def test_nan_latent_stops_at_the_step_that_made_it(pipe):
    request = pipe.prepare_request("x", **FAST)
    noise = pipe.initial_noise(request)
    noise[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(OsxError, match="after denoising step 1 of 2 holds NaN or infinite values"):
        pipe.run(request, noise)


def test_nan_frames_stop_at_the_vae_chunk(pipe, monkeypatch):
    decoder = pipe.backends["vae_decoder"]
    real_run = decoder.run
    monkeypatch.setattr(decoder, "run", lambda inputs: {"video": real_run(inputs)["video"] * np.inf})
    with pytest.raises(OsxError, match="frames of VAE chunk 1 of 1 holds NaN or infinite values"):
        pipe.generate("x", **FAST)


@pytest.mark.parametrize("args,message", [
    (["--steps", "100000"], "steps=100000 is outside 1..1000"),
    (["--guidance-scale", "1e308"], "guidance scale=1e+308 is outside"),
])
def test_cli_refuses_before_compute_and_writes_nothing(tiny_bundle, tmp_path, capsys, args, message):
    out = tmp_path / "a.mp4"
    code, _, err = run(capsys, "generate", tiny_bundle, "--prompt", "x", "--out", out, "--codec", "mp4v", *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
