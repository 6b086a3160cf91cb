"""Issue #18 items 5 and 11: OS errors (full disk, read-only folder) and a missing extra end every CLI
command with `error:` + `hint:` lines and exit 2, no traceback, nothing half-written."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from osx import archive
from test_bundle_cli import run


def _fail_with(err: int, text: str):
    def fail(*args, **kwargs):
        raise OSError(err, text, "/data/out/file")
    return fail


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_pack_on_a_full_disk(fake_bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(archive._HashingReader, "read", _fail_with(errno.ENOSPC, "No space left on device"))
    code, out, err = run(capsys, "bundle", "pack", fake_bundle, "-o", tmp_path / "m.osx.tar")
    assert code == 2 and "error: No space left on device: /data/out/file" in err and "hint: the disk is full" in err
    assert "Traceback" not in err and not (tmp_path / "m.osx.tar").exists() and _leftovers(tmp_path) == []


def test_unpack_on_a_read_only_disk(fake_bundle, tmp_path, capsys, monkeypatch):
    tar_path = tmp_path / "m.osx.tar"
    archive.pack(fake_bundle, tar_path)
    monkeypatch.setattr(archive, "_copy_checked", _fail_with(errno.EROFS, "Read-only file system"))
    code, _, err = run(capsys, "bundle", "unpack", tar_path, tmp_path / "opt")
    assert code == 2 and "Read-only file system" in err and "hint: that file system is read-only" in err
    assert not (tmp_path / "opt").exists() and _leftovers(tmp_path) == []


def test_video_write_on_a_full_disk(tiny_bundle, tmp_path, capsys, monkeypatch):
    from osx.runtime import video

    monkeypatch.setattr(video, "_write_cv2", _fail_with(errno.ENOSPC, "No space left on device"))
    code, _, err = run(capsys, "generate", tiny_bundle, "--prompt", "x", "--out", tmp_path / "a.mp4", "--codec", "mp4v",
                       "--frames", "17", "--steps", "1", "--resolution", "32x32")
    assert code == 2 and "No space left on device" in err and "hint: the disk is full" in err
    assert list(tmp_path.iterdir()) == []


def test_export_on_a_full_disk(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from osx.export import exporter

    monkeypatch.setattr(exporter, "export_one", _fail_with(errno.ENOSPC, "No space left on device"))
    code, _, err = run(capsys, "export", "--model", "opensora-v1.2-tiny", "--random-weights", "--out", tmp_path / "b")
    assert code == 2 and "No space left on device" in err and "hint:" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# The base install: the export stack made unimportable, as on `pip install .` without extras.
NO_ONNX = textwrap.dedent("""
    import sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"onnx", "onnxscript", "onnxslim"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Block())
    from osx.cli import main
    main(sys.argv[1:])
""")


def test_export_without_the_export_extra_names_it(tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_ONNX, "export", "--model", "opensora-v1.2-tiny", "--random-weights",
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "needs the `export` extra" in r.stderr and 'pip install -e ".[export]"' in r.stderr
    assert list(tmp_path.iterdir()) == []
