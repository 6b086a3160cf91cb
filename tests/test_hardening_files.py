"""Issue #18 items 1 and 4: `--force` replaces only what osx wrote, and what osx writes is readable by
others as the user's umask says (not mkdtemp's 0700)."""

import os
import stat

import pytest

from osx import archive
from osx.bundle import BundleWriter
from osx.errors import OsxError
from test_bundle_cli import run


@pytest.fixture
def users_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    return folder


@pytest.fixture
def packed(fake_bundle, tmp_path):
    tar_path = tmp_path / "model.osx.tar"
    archive.pack(fake_bundle, tar_path)
    return tar_path


def test_unpack_force_refuses_a_folder_that_is_not_a_bundle(packed, users_folder, capsys):
    code, out, err = run(capsys, "bundle", "unpack", packed, users_folder, "--force")
    assert code == 2 and "not an osx bundle" in err and "holiday.jpg" in err and "hint:" in err
    assert (users_folder / "holiday.jpg").read_bytes() == b"precious"
    assert not [p for p in users_folder.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_unpack_force_replaces_an_empty_folder_or_a_bundle(packed, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(capsys, "bundle", "unpack", packed, empty, "--force")[0] == 0
    assert run(capsys, "bundle", "unpack", packed, empty, "--force")[0] == 0  # now a bundle
    assert (empty / "manifest.json").is_file()


def test_export_force_refuses_a_folder_that_is_not_a_bundle(users_folder):
    with pytest.raises(OsxError, match="not an osx bundle"):
        BundleWriter(users_folder, force=True)
    assert (users_folder / "holiday.jpg").read_bytes() == b"precious"


def test_export_cli_force_refuses_before_any_work(users_folder, capsys):
    pytest.importorskip("torch")
    code, _, err = run(capsys, "export", "--model", "opensora-v1.2-tiny", "--random-weights", "--out", users_folder, "--force")
    assert code == 2 and "not an osx bundle" in err
    assert sorted(p.name for p in users_folder.iterdir()) == ["holiday.jpg"]


def test_pack_force_refuses_a_file_that_is_not_an_archive(fake_bundle, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    code, _, err = run(capsys, "bundle", "pack", fake_bundle, "-o", notes, "--force")
    assert code == 2 and "not a tar archive" in err and notes.read_text() == "mine"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_bundle_folders_and_archives_get_the_umask_modes(umask_022, fake_bundle, tmp_path):
    # umask_022 comes first, so fake_bundle is written by BundleWriter (the exporter's writer) under it
    assert _mode(fake_bundle) == 0o755  # mkdtemp alone gives 0700: unreadable for a service user
    tar_path = tmp_path / "m.osx.tar"
    archive.pack(fake_bundle, tar_path)
    assert _mode(tar_path) == 0o644  # mkstemp alone gives 0600
    archive.unpack(tar_path, tmp_path / "opt" / "models" / "tiny")
    unpacked = tmp_path / "opt" / "models" / "tiny"
    assert _mode(unpacked) == 0o755
    assert _mode(unpacked / "engines") == 0o755 and _mode(unpacked / "manifest.json") == 0o644


def test_calibrate_force_refuses_a_folder_that_is_not_a_calibration_set(users_folder):
    from osx.calibration.capture import capture

    with pytest.raises(OsxError, match="not an osx calibration set"):
        capture(None, users_folder, {}, force=True)  # refused before the model or recipe is touched
    assert (users_folder / "holiday.jpg").read_bytes() == b"precious"
