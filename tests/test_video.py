"""Frames, writers, preview and the fail-fast output checks."""

import logging
import os

import numpy as np
import pytest

from osx.errors import OsxError
from osx.runtime import video

torch = pytest.importorskip("torch")


def gradient_frames(t=10, h=64, w=96):
    """Smooth moving gradients: codecs keep them close, so a read-back can be compared."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 2 + 8 * i) % 256, (y * 3 + 5 * i) % 256, np.full_like(x, 40 + 10 * i)], -1) for i in range(t)]
    return np.array(frames, dtype=np.uint8)


def test_to_uint8_frames_equals_open_sora_save():
    rng = np.random.default_rng(0)
    v = (rng.standard_normal((3, 5, 8, 6)) * 0.8).astype(np.float32)
    v[0, 0, 0, :3] = [-1.0, 1.0, 2.5]  # the ends and an out-of-range value
    # opensora/datasets/utils.py save_sample: clamp_, sub_(low).div_(high - low), mul(255).add_(0.5).clamp_(0, 255)
    x = torch.from_numpy(v.copy()).clamp_(-1, 1)
    x.sub_(-1).div_(2)
    want = x.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 3, 0).to(torch.uint8).numpy()
    got = video.to_uint8_frames(v)
    assert got.dtype == np.uint8 and got.shape == (5, 8, 6, 3) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("codec,name", [("h264", "clip.mp4"), ("mp4v", "clip.mp4"), ("vp9", "clip.webm")])
def test_write_and_read_back(codec, name, tmp_path):
    if codec == "h264" and not video.has_pyav():
        pytest.skip("PyAV (the h264 extra) not installed")
    frames = gradient_frames()
    out = video.write_video(frames, tmp_path / name, fps=24, codec=codec)
    assert out == tmp_path / name and out.stat().st_size > 0
    assert video.read_video_info(out) == (10, 64, 96)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_h264_content_survives_and_odd_sizes_are_padded(tmp_path):
    av = pytest.importorskip("av")
    frames = gradient_frames(t=6, h=33, w=47)
    out = video.write_video(frames, tmp_path / "odd.mp4", fps=12, codec="h264")
    assert video.read_video_info(out) == (6, 34, 48)
    with av.open(str(out)) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == 12
        decoded = np.array([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
    assert np.abs(decoded[:, :33, :47].astype(int) - frames).mean() < 6  # lossy, but the same picture


def _noisy_frames():
    """Like the tiny bundle's frames: 34 noisy 64x64 frames."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    waves = np.sin(x[None, ..., None] / 5 + rng.normal(0, 1, (34, 1, 1, 3)).cumsum(0)) * np.cos(y[None, ..., None] / 7)
    return np.clip(128 + 100 * waves + rng.normal(0, 10, (34, 64, 64, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec", ["h264", "mp4v"])
def test_same_frames_give_the_same_file_from_threads(codec, tmp_path):
    """What makes a served video equal `osx generate`'s: the file is a function of the frames. Written 12
    times from 4 threads at once: with x264's AVX-512 code (before it was left out) 5-10 different files."""
    from concurrent.futures import ThreadPoolExecutor

    if codec == "h264" and not video.has_pyav():
        pytest.skip("PyAV (the h264 extra) not installed")
    frames = _noisy_frames()
    with ThreadPoolExecutor(4) as pool:
        paths = pool.map(lambda i: video.write_video(frames, tmp_path / f"{i}.mp4", fps=24, codec=codec), range(12))
        files = {p.read_bytes() for p in paths}
    assert len(files) == 1


def test_same_frames_give_the_same_file_after_a_generation(tiny_bundle, tmp_path):
    """The served-vs-CLI difference itself: a replica encodes after denoising in the same process, the
    CLI too, after other work. With x264's AVX-512 code each write after a generation differed."""
    if not video.has_pyav():
        pytest.skip("PyAV (the h264 extra) not installed")
    from osx.runtime.pipeline import Pipeline

    pipe, frames, files = Pipeline.load(tiny_bundle, verify=False), _noisy_frames(), set()
    for seed in range(3):
        files.add(video.write_video(frames, tmp_path / f"{seed}.mp4", fps=24, codec="h264").read_bytes())
        pipe.generate("a fox", seed=seed, steps=2)
    assert len(files) == 1


def test_auto_codec_and_log_line(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="osx.runtime.video")
    assert video.resolve_codec("a.webm") == "vp9"
    monkeypatch.setattr(video, "has_pyav", lambda: False)
    assert video.resolve_codec("a.mp4") == "mp4v"
    video.write_video(gradient_frames(t=3), tmp_path / "a.mp4", fps=24)
    assert "OpenCV mp4v" in caplog.text
    with pytest.raises(OsxError, match="H.264 needs PyAV") as e:
        video.resolve_codec("a.mp4", "h264")
    assert "--codec mp4v" in e.value.hint
    monkeypatch.setattr(video, "has_pyav", lambda: True)
    assert video.resolve_codec("a.mp4") == "h264"


def test_check_writable_fails_fast(tmp_path):
    with pytest.raises(OsxError, match="does not exist"):
        video.check_writable(tmp_path / "missing" / "clip.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OsxError, match="does not exist"):
        video.check_writable(tmp_path / "file" / "clip.mp4")
    with pytest.raises(OsxError, match="not '.avi'"):
        video.check_writable(tmp_path / "clip.avi")
    with pytest.raises(OsxError, match="writes .webm"):
        video.check_writable(tmp_path / "clip.mp4", codec="vp9")
    with pytest.raises(OsxError, match="unknown codec"):
        video.check_writable(tmp_path / "clip.mp4", codec="divx")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(OsxError, match="is a folder"):
        video.check_writable(tmp_path / "dir.mp4")
    with pytest.raises(OsxError, match="expected a .png"):
        video.check_writable(tmp_path / "p.jpg", suffixes=(".png",))
    assert video.check_writable(tmp_path / "ok.mp4", codec="mp4v") == tmp_path / "ok.mp4"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_check_writable_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OsxError, match="not writable"):
            video.check_writable(ro / "clip.mp4", codec="mp4v")
    finally:
        ro.chmod(0o700)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(frames, path, fps, codec):
        path.write_bytes(b"partial")
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video, "_write_cv2", broken)
    with pytest.raises(RuntimeError):
        video.write_video(gradient_frames(t=2), tmp_path / "x.mp4", fps=24, codec="mp4v")
    assert list(tmp_path.iterdir()) == []


def test_preview_contact_sheet(tmp_path):
    import cv2

    frames = gradient_frames(t=10, h=64, w=96)
    out = video.write_preview(frames, tmp_path / "p.png", n=6)
    sheet = cv2.imread(str(out))[..., ::-1]
    # 6 tiles: 2 rows of 3; tiles 64x96 (under 512 wide), 4 px gaps
    assert sheet.shape == (2 * 64 + 4, 3 * 96 + 2 * 4, 3)
    np.testing.assert_array_equal(sheet[:64, :96], frames[0])  # PNG is lossless
    np.testing.assert_array_equal(sheet[68:, 200:296], frames[9])  # the 6th tile is the last frame
    big = np.zeros((3, 100, 1024, 3), np.uint8)
    sheet = cv2.imread(str(video.write_preview(big, tmp_path / "b.png", n=4)))
    assert sheet.shape == (50, 3 * 512 + 2 * 4, 3)  # 3 frames only; tiles scaled to 512 wide
