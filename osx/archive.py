"""Bundle archives: one `.osx.tar` file per bundle, for shipping.

`pack` is deterministic: manifest.json first, then the manifest's files in sorted order, each a plain
file with fixed mtime/owner/mode, so the same bundle always packs to the same bytes (and a hash of the
archive identifies the bundle). Only the manifest's files go in: a bundle is verified before packing and
each file is hashed again while it is copied into the archive, so what ships is what was checked.

`unpack` trusts nothing in the archive. Before anything is written it reads the member list and the
manifest and refuses absolute paths, `..`, links, devices, duplicates, members the manifest does not
list or whose size differs from it, and sizes over the caps. Then it copies each member into a temp
folder beside the target (never through tarfile's extract, so no member can set a link, mode or owner),
checks every sha256 against the manifest and renames the folder into place. A refused or interrupted
unpack leaves nothing behind.

`verify_archive` runs the same checks, streaming each member through sha256 without writing anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import shutil
import tarfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from osx.bundle import MANIFEST, Bundle, is_bundle
from osx.consistency import check_graphs
from osx.manifest import Manifest
from osx.errors import BundleError, OsxError
from osx.files import check_replaceable, make_temp_dir, make_temp_file, replace_folder

ARCHIVE_SUFFIX = ".osx.tar"
MAX_MANIFEST_BYTES = 16 << 20
# Caps on what an archive may make us write. The largest real part is the T5-XXL encoder's fp32
# external data (~19 GB); the caps leave room for that and refuse anything absurd.
MAX_MEMBER_BYTES = 64 << 30
MAX_TOTAL_BYTES = 256 << 30
_CHUNK = 1 << 20


def is_archive(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_file() and tarfile.is_tarfile(p)


# --- pack ---------------------------------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """A file wrapper that hashes what tarfile reads from it, so the packed bytes are the hashed bytes."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def pack(bundle_dir: str | os.PathLike, out_tar: str | os.PathLike, force: bool = False) -> Manifest:
    """Write `bundle_dir` to `out_tar` deterministically and atomically. Returns the bundle's manifest.

    Raises BundleError if the bundle is incomplete or a file's checksum does not match its manifest.
    """
    bundle = Bundle.open(bundle_dir, verify=False)
    bundle.verify(checksums=False)  # sizes, extras, references; checksums are taken while packing below
    out = Path(out_tar).absolute()
    if out.is_dir():
        raise OsxError(f"{out} is a folder", hint="give the archive's file name, e.g. -o model.osx.tar")
    check_replaceable(out, force, ours=is_archive, what="a tar archive", option="-o")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp_file(f".{out.name}.tmp-", out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                manifest_bytes = (bundle.root / MANIFEST).read_bytes()
                tar.addfile(_member(MANIFEST, len(manifest_bytes)), io.BytesIO(manifest_bytes))
                for rel, meta in sorted(bundle.manifest.files.items()):
                    with open(bundle.root / rel, "rb") as f:
                        reader = _HashingReader(f)
                        tar.addfile(_member(rel, meta.bytes), reader)
                    if reader.sha.hexdigest() != meta.sha256:
                        raise BundleError(f"{bundle.root}: checksum mismatch for {rel}",
                                          hint="the file is corrupt or was edited; re-export the bundle before packing")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return bundle.manifest


# --- reading an archive safely -------------------------------------------------------------------------


def _safe_name(archive: Path, member: tarfile.TarInfo) -> str:
    """The member's bundle-relative path, or BundleError if it could land outside the bundle."""
    name = member.name
    if "\\" in name or "\x00" in name or name.startswith("/") or posixpath.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"{archive}: refusing member {name!r}: absolute path", hint="the archive is not a safe osx bundle archive")
    if ".." in name.split("/"):
        raise BundleError(f"{archive}: refusing member {name!r}: path leaves the bundle folder", hint="the archive is not a safe osx bundle archive")
    norm = posixpath.normpath(name)
    if norm == "." and not member.isdir():
        raise BundleError(f"{archive}: refusing member {name!r}: not a file name", hint="the archive is not a safe osx bundle archive")
    return norm


def _read_index(archive: Path, tar: tarfile.TarFile, max_member_bytes: int, max_total_bytes: int) -> tuple[Manifest, dict[str, tarfile.TarInfo]]:
    """Check every member header and the manifest before anything is written: (manifest, rel -> member)."""
    members: dict[str, tarfile.TarInfo] = {}
    for m in tar.getmembers():
        rel = _safe_name(archive, m)
        if m.isdir():
            continue  # folders are implied by the file paths; the archive cannot set their modes
        if not m.isreg():
            kind = "symlink" if m.issym() else "hard link" if m.islnk() else "device file" if (m.ischr() or m.isblk()) else "special file"
            raise BundleError(f"{archive}: refusing member {m.name!r}: {kind}", hint="a bundle archive holds only plain files")
        if rel in members:
            raise BundleError(f"{archive}: member {rel!r} appears twice", hint="the archive is not a safe osx bundle archive")
        cap = MAX_MANIFEST_BYTES if rel == MANIFEST else max_member_bytes
        if m.size > cap:
            raise BundleError(f"{archive}: member {rel!r} is {m.size} bytes, over the {cap}-byte cap",
                              hint="the archive is not a plausible bundle; if it is trusted, raise the cap")
        members[rel] = m
    if MANIFEST not in members:
        raise BundleError(f"{archive}: no {MANIFEST} in the archive", hint="make bundle archives with `osx bundle pack`")
    try:
        manifest = json.loads(tar.extractfile(members[MANIFEST]).read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{archive}: {MANIFEST} is not valid JSON: {e}", hint="the archive is corrupt; pack the bundle again") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{archive}: {MANIFEST} is not a JSON object", hint="the archive is corrupt; pack the bundle again")
    manifest = Manifest.from_dict(manifest, archive)
    files = manifest.files
    extra = sorted(set(members) - set(files) - {MANIFEST})
    if extra:
        raise BundleError(f"{archive}: members not in the manifest: {extra[:5]}", hint="the archive was altered; pack the bundle again")
    for rel, meta in files.items():
        if rel not in members:
            raise BundleError(f"{archive}: missing file {rel}", hint="the archive is incomplete; pack the bundle again")
        if members[rel].size != meta.bytes:
            raise BundleError(f"{archive}: {rel} has {members[rel].size} bytes, manifest says {meta.bytes}",
                              hint="the archive is corrupt; pack the bundle again")
    for ref in manifest.referenced_files():
        if ref not in files:
            raise BundleError(f"{archive}: manifest refers to {ref!r}, which is not checksummed in `files`")
    total = sum(m.size for m in members.values())
    if total > max_total_bytes:
        raise BundleError(f"{archive}: members total {total} bytes, over the {max_total_bytes}-byte cap",
                          hint="pass a larger max_total_bytes if the archive is trusted")
    return manifest, members


def _copy_checked(archive: Path, tar: tarfile.TarFile, rel: str, member: tarfile.TarInfo, sha256: str,
                  sink: Callable[[bytes], Any] | None) -> None:
    src = tar.extractfile(member)
    h = hashlib.sha256()
    while block := src.read(_CHUNK):
        h.update(block)
        if sink is not None:
            sink(block)
    if h.hexdigest() != sha256:
        raise BundleError(f"{archive}: checksum mismatch for {rel}", hint="the archive is corrupt or was edited; pack the bundle again")


def _open_tar(archive: Path) -> tarfile.TarFile:
    if not archive.is_file():
        raise BundleError(f"archive {archive} does not exist", hint="make one with `osx bundle pack DIR -o model.osx.tar`")
    try:
        return tarfile.open(archive, mode="r:*")
    except tarfile.TarError as e:
        raise BundleError(f"{archive} is not a tar archive: {e}", hint="make one with `osx bundle pack DIR -o model.osx.tar`") from None


def read_manifest(archive: str | os.PathLike) -> Manifest:
    """The manifest of an archive (member list and schema checked, checksums not): for `osx bundle info`."""
    archive = Path(archive)
    with _open_tar(archive) as tar:
        try:
            return _read_index(archive, tar, MAX_MEMBER_BYTES, MAX_TOTAL_BYTES)[0]
        except tarfile.TarError as e:
            raise BundleError(f"{archive} is a damaged tar archive: {e}") from None


def verify_archive(archive: str | os.PathLike, max_member_bytes: int = MAX_MEMBER_BYTES,
                   max_total_bytes: int = MAX_TOTAL_BYTES) -> Manifest:
    """Check an archive as `unpack` would, streaming every member through sha256 and writing nothing."""
    archive = Path(archive)
    with _open_tar(archive) as tar:
        try:
            manifest, members = _read_index(archive, tar, max_member_bytes, max_total_bytes)
            for rel, meta in sorted(manifest.files.items()):
                _copy_checked(archive, tar, rel, members[rel], meta.sha256, sink=None)
        except tarfile.TarError as e:
            raise BundleError(f"{archive} is a damaged tar archive: {e}") from None
    return manifest


def unpack(archive: str | os.PathLike, out_dir: str | os.PathLike, force: bool = False,
           max_member_bytes: int = MAX_MEMBER_BYTES, max_total_bytes: int = MAX_TOTAL_BYTES) -> Bundle:
    """Extract a bundle archive to `out_dir`, atomically, with every checksum verified. Returns the Bundle."""
    archive = Path(archive)
    out = Path(out_dir).absolute()
    check_replaceable(out, force, ours=is_bundle, what="an osx bundle", option="folder")
    if out.is_file():
        raise OsxError(f"{out} is a file", hint="choose a folder to unpack into")
    with _open_tar(archive) as tar:
        try:
            manifest, members = _read_index(archive, tar, max_member_bytes, max_total_bytes)
            out.parent.mkdir(parents=True, exist_ok=True)
            needed = sum(m.size for m in members.values())
            free = shutil.disk_usage(out.parent).free
            if needed > free:
                raise BundleError(f"unpacking {archive} needs {needed} bytes, {out.parent} has {free} free",
                                  hint="free some space or unpack elsewhere")
            tmp = make_temp_dir(f".{out.name}.unpack-", out.parent)
            try:
                for rel, member in sorted(members.items()):
                    dest = tmp / rel
                    if not dest.resolve().is_relative_to(tmp.resolve()):  # _safe_name already ensures this
                        raise BundleError(f"{archive}: refusing member {rel!r}: path leaves the bundle folder")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    sha = manifest.files[rel].sha256 if rel != MANIFEST else None
                    with open(dest, "xb") as f:
                        if sha is None:
                            f.write(tar.extractfile(member).read())
                        else:
                            _copy_checked(archive, tar, rel, member, sha, sink=f.write)
                bundle = Bundle.open(tmp, verify=False)
                bundle.verify(checksums=False)  # checksums were taken while copying; this checks the structure
                replace_folder(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        except tarfile.TarError as e:
            raise BundleError(f"{archive} is a damaged tar archive: {e}") from None
    return Bundle(out, manifest)


def open_manifest(path: str | os.PathLike) -> tuple[Manifest, str]:
    """(manifest, "folder" | "archive") for a bundle folder or archive, without checking checksums."""
    p = Path(path)
    if p.is_dir():
        return Bundle.open(p, verify=False).manifest, "folder"
    return read_manifest(p), "archive"


def verify_path(path: str | os.PathLike) -> Manifest:
    """Fully verify a bundle folder or archive (schema, sizes, every sha256). Raises BundleError."""
    p = Path(path)
    if p.is_dir():
        manifest = Bundle.open(p, verify=True).manifest  # the load checks ranges and dtypes (osx.consistency)
        check_graphs(p, manifest.to_dict())
        return manifest
    return verify_archive(p)
