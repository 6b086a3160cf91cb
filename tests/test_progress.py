"""Phase-named progress (osx.runtime.progress) where progress is shown: the fractions `osx serve` stores, the
CLI's bars (one per sampling loop), for a text-to-image-to-video run's two loops and for v1.2's events."""

from types import SimpleNamespace

import pytest

from osx.commands.generate import _BarProgress
from osx.runtime.progress import PHASES, SAMPLING_LOOPS, Fractions

T2I2V = [("text_encoder", 1), ("t2i", 4), ("t2i_decode", 1), ("vae_encode", 1), ("denoise", 5), ("vae_decode", 2)]


def events(phases):
    return [{"phase": p, "step": k, "total": n, "elapsed": 0.0, "eta": 0.0} for p, n in phases for k in range(1, n + 1)]


def test_phases_are_named_in_run_order_and_two_are_sampling_loops():
    assert [p for p, _ in T2I2V] == list(PHASES) and SAMPLING_LOOPS == ("t2i", "denoise")


def test_fractions_count_every_step_of_every_phase():
    f = Fractions(T2I2V, extra=1)
    got = [f(e) for e in events(T2I2V)]
    assert got == [k / 15 for k in range(1, 15)]  # 14 steps + writing the file
    assert f({"phase": "unannounced", "step": 1, "total": 1}) == got[-1]  # never falls back
    assert Fractions(T2I2V)({"phase": "vae_decode", "step": 2, "total": 2}) == 1.0


def test_served_status_carries_the_phase_and_a_fraction_over_both_loops(monkeypatch):
    pytest.importorskip("ray")
    from osx.runtime.serving import app
    from osx.runtime.serving.app import Generator

    monkeypatch.setattr(app, "PROGRESS_EVERY_S", 0.0)  # every event written (throttling: the test below)

    written = []
    fake = SimpleNamespace(pipeline=SimpleNamespace(progress_phases=lambda request, reference=False: T2I2V),
                           store=SimpleNamespace(write=lambda s: written.append(dict(s["progress"])), cancel_requested=lambda i: False))
    progress = Generator.func_or_class._progress(fake, {"id": "job"}, request=None)
    assert all(progress(e) for e in events(T2I2V))
    assert [w["phase"] for w in written] == [p for p, n in T2I2V for _ in range(n)]
    fractions = [w["fraction"] for w in written]
    assert fractions == sorted(fractions) and fractions[-1] == round(14 / 15, 4)
    assert written[1] == {"phase": "t2i", "step": 1, "total": 4, "fraction": round(2 / 15, 4), "eta": written[1]["eta"]}


def test_served_progress_is_written_at_most_every_interval_and_at_each_phase_end():
    """Events faster than PROGRESS_EVERY_S: the first and each phase's last reach the store and look for a
    cancel, the others touch no file; a cancel stops the run at the next of those."""
    pytest.importorskip("ray")
    from osx.runtime.serving.app import Generator

    written, checks = [], []
    fake = SimpleNamespace(pipeline=SimpleNamespace(progress_phases=lambda request, reference=False: T2I2V),
                           store=SimpleNamespace(write=lambda s: written.append(dict(s["progress"])),
                                                 cancel_requested=lambda i: checks.append(i) or False))
    progress = Generator.func_or_class._progress(fake, {"id": "job"}, request=None)
    assert all(progress(e) for e in events(T2I2V))
    assert [(w["phase"], w["step"]) for w in written] == [(p, n) for p, n in T2I2V]
    assert len(checks) == len(written) and progress.seconds > 0
    fake.store.cancel_requested = lambda i: True
    progress = Generator.func_or_class._progress(fake, {"id": "job"}, request=None)
    assert [progress(e) for e in events(T2I2V)][:2] == [False, True]  # the first event looks; the second does not


def test_cli_shows_a_bar_per_sampling_loop(capsys):
    bar = _BarProgress()
    for e in events(T2I2V):
        bar(e)
    bar.close()
    err = capsys.readouterr().err
    assert "image (Flux): 100%" in err and "4/4" in err and "denoising: 100%" in err and "5/5" in err
    assert err.index("image (Flux)") < err.index("decoded the first frame") < err.index("denoising") < err.index("decoded in 2 VAE call(s)")


def test_cli_bar_for_v1_2_events_is_unchanged(capsys):
    bar = _BarProgress()
    for e in events([("text_encoder", 1), ("denoise", 3), ("vae_decode", 1)]):
        bar(e)
    err = capsys.readouterr().err
    assert "denoising: 100%" in err and "3/3" in err and "image" not in err and "decoded in 1 VAE call(s)" in err


def test_v2_0_pipeline_announces_its_phases():
    """Open-Sora v2.0 at 256px 16:9, 129 frames: T5 then CLIP, 50 steps, 1x2 VAE tiles (design doc 4.3)."""
    from osx.models_v2 import OPENSORA_V2_0
    from osx.runtime.pipeline_v2 import PipelineV2, RequestV2

    pipe = object.__new__(PipelineV2)
    pipe.model, pipe.tokenizers, pipe.backends = OPENSORA_V2_0, {"text_encoder": None, "clip": None}, {}
    request = RequestV2("x", None, num_frames=129, height=192, width=336, fps=24, steps=50, guidance_scale=7.5, seed=1)
    assert pipe.progress_phases(request) == [("text_encoder", 2), ("denoise", 50), ("vae_decode", 2)]
    # a bundle with t2i2v's components: the image loop (Flux's 50 steps) and its decode, then the image encoded
    pipe.backends = {"t2i_denoiser": None, "t2i_decoder": None}
    assert pipe.progress_phases(request) == [("text_encoder", 2), ("t2i", 50), ("t2i_decode", 1), ("vae_encode", 1),
                                             ("denoise", 50), ("vae_decode", 2)]
    assert pipe.progress_phases(request, reference=True)[0] == ("vae_encode", 1)  # a reference image turns t2i2v off
