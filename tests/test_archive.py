"""Bundle archives: deterministic pack, safe atomic unpack, streaming verify, hostile archives refused."""

import io
import json
import os
import tarfile

import pytest

from osx import archive
from osx.bundle import Bundle
from osx.errors import BundleError, OsxError


def _members(bundle_dir):
    """(name, bytes) of a bundle folder, manifest first, read straight from disk."""
    files = json.loads((bundle_dir / "manifest.json").read_text())["files"]
    return [("manifest.json", (bundle_dir / "manifest.json").read_bytes())] + [
        (rel, (bundle_dir / rel).read_bytes()) for rel in sorted(files)]


def _write_tar(path, entries):
    """entries: (name, bytes) for plain files, or a ready TarInfo (links, devices) with no data."""
    with tarfile.open(path, "w") as tar:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tar.addfile(e)
            else:
                name, data = e
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def dest(tmp_path):
    d = tmp_path / "dest"
    d.mkdir()
    return d


def test_pack_unpack_verify_round_trip(fake_bundle, tmp_path, dest):
    tar_path = tmp_path / "b.osx.tar"
    archive.pack(fake_bundle, tar_path)
    assert archive.is_archive(tar_path)
    archive.verify_archive(tar_path)
    out = archive.unpack(tar_path, dest / "b")
    Bundle.open(dest / "b", verify=True)
    assert out.root == dest / "b"
    for name, data in _members(fake_bundle):
        assert (dest / "b" / name).read_bytes() == data


def test_pack_is_deterministic_and_normalised(fake_bundle, tmp_path):
    a, b = tmp_path / "a.osx.tar", tmp_path / "b.osx.tar"
    archive.pack(fake_bundle, a)
    for p in fake_bundle.rglob("*"):  # new mtimes and modes must not change the archive
        os.utime(p, (1_700_000_000, 1_700_000_000))
        if p.is_file():
            p.chmod(0o600)
    archive.pack(fake_bundle, b)
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        infos = tar.getmembers()
        names = [m.name for m in infos]
        assert names[0] == "manifest.json" and names[1:] == sorted(names[1:])
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) for m in infos} == {(0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
        assert not any(m.pax_headers for m in infos)
        assert [(m.name, tar.extractfile(m).read()) for m in infos] == _members(fake_bundle)


def test_pack_refuses_corrupt_bundle_and_writes_nothing(fake_bundle, tmp_path):
    target = fake_bundle / "denoiser.onnx"
    data = bytearray(target.read_bytes())
    data[10] ^= 0xFF  # same size: only the checksum taken while packing can catch it
    target.write_bytes(bytes(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(BundleError, match="checksum mismatch for denoiser.onnx"):
        archive.pack(fake_bundle, out_dir / "b.osx.tar")
    assert list(out_dir.iterdir()) == []


def test_pack_refuses_existing_archive_without_force(fake_bundle, tmp_path):
    out = tmp_path / "b.osx.tar"
    out.write_bytes(b"keep me")
    with pytest.raises(OsxError, match="already exists"):
        archive.pack(fake_bundle, out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(OsxError, match="not a tar archive"):  # --force replaces only an archive
        archive.pack(fake_bundle, out, force=True)
    assert out.read_bytes() == b"keep me"
    out.unlink()
    archive.pack(fake_bundle, out)
    archive.pack(fake_bundle, out, force=True)
    archive.verify_archive(out)


def test_unpack_refuses_existing_folder_without_force(fake_bundle, tmp_path, dest):
    tar_path = tmp_path / "b.osx.tar"
    archive.pack(fake_bundle, tar_path)
    archive.unpack(tar_path, dest / "b")
    (dest / "b" / "old.txt").write_text("old")  # an old bundle, with a stray file
    with pytest.raises(OsxError, match="already exists"):
        archive.unpack(tar_path, dest / "b")
    archive.unpack(tar_path, dest / "b", force=True)
    assert not (dest / "b" / "old.txt").exists()
    Bundle.open(dest / "b")
    assert sorted(p.name for p in dest.iterdir()) == ["b"]  # no temp or old folders left


def _special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.devmajor, info.devminor = kind, linkname, 1, 3
    return info


HOSTILE = {
    "path traversal": (lambda m, tmp: m + [("../evil.txt", b"x")], "leaves the bundle folder"),
    "nested traversal": (lambda m, tmp: m + [("engines/../../evil.txt", b"x")], "leaves the bundle folder"),
    "absolute path": (lambda m, tmp: m + [(str(tmp / "evil_abs.txt"), b"x")], "absolute path"),
    "symlink": (lambda m, tmp: m + [_special("link", tarfile.SYMTYPE, "/etc/passwd")], "symlink"),
    "symlink replacing a file": (lambda m, tmp: [e for e in m if e[0] != "tokenizer.json"] + [_special("tokenizer.json", tarfile.SYMTYPE, "/etc/passwd")], "symlink"),
    "hard link": (lambda m, tmp: m + [_special("hl", tarfile.LNKTYPE, "manifest.json")], "hard link"),
    "device file": (lambda m, tmp: m + [_special("dev", tarfile.CHRTYPE)], "device file"),
    "fifo": (lambda m, tmp: m + [_special("fifo", tarfile.FIFOTYPE)], "special file"),
    "missing manifest": (lambda m, tmp: m[1:], "no manifest.json"),
    "duplicate member": (lambda m, tmp: m + [m[-1]], "appears twice"),
    "member not in manifest": (lambda m, tmp: m + [("extra.bin", b"x")], "not in the manifest"),
    "missing member": (lambda m, tmp: [e for e in m if e[0] != "vae_decoder.onnx"], "missing file vae_decoder.onnx"),
    "member larger than manifest says": (lambda m, tmp: [(n, d + b"!" if n == "tokenizer.json" else d) for n, d in m], "tokenizer.json has"),
    "bad checksum": (lambda m, tmp: [(n, d[:-1] + bytes([d[-1] ^ 1]) if n == "vae_decoder.onnx" else d) for n, d in m],
                     "checksum mismatch for vae_decoder.onnx"),
    "manifest not JSON": (lambda m, tmp: [("manifest.json", b"{nope")] + m[1:], "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_unpack_refuses_hostile_archive_and_writes_nothing(case, fake_bundle, tmp_path, dest):
    make, message = HOSTILE[case]
    tar_path = _write_tar(tmp_path / "evil.tar", make(_members(fake_bundle), tmp_path))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(BundleError, match=message):
        archive.unpack(tar_path, dest / "b")
    assert list(dest.iterdir()) == []  # no bundle, no temp folder
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing escaped beside it either
    with pytest.raises(BundleError, match=message):  # verify refuses it the same way
        archive.verify_archive(tar_path)


def test_unpack_refuses_oversized_members(fake_bundle, tmp_path, dest):
    tar_path = tmp_path / "b.osx.tar"
    archive.pack(fake_bundle, tar_path)
    with pytest.raises(BundleError, match="'engines/denoiser.plan' is 3000 bytes, over the 2000-byte cap"):
        archive.unpack(tar_path, dest / "b", max_member_bytes=2000)
    total = sum(len(d) for _, d in _members(fake_bundle))
    with pytest.raises(BundleError, match=f"total {total} bytes, over"):
        archive.unpack(tar_path, dest / "b", max_total_bytes=total - 1)
    assert list(dest.iterdir()) == []


def test_unpack_accepts_plain_tar_of_the_folder(fake_bundle, tmp_path, dest):
    # `tar -C bundle -cf x.tar .` gives "./"-prefixed names and folder entries: still a valid bundle archive
    tar_path = tmp_path / "plain.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(fake_bundle, arcname=".")
    archive.unpack(tar_path, dest / "b")
    Bundle.open(dest / "b", verify=True)


def test_not_a_tar(tmp_path, dest):
    bogus = tmp_path / "x.osx.tar"
    bogus.write_bytes(b"not a tar" * 100)
    with pytest.raises(BundleError, match="not a tar archive"):
        archive.unpack(bogus, dest / "b")
    assert list(dest.iterdir()) == []

