"""The bundle folder: `manifest.json` (osx.manifest, the typed contract) plus every file it lists.

The manifest lists every other file in the folder with its size and sha256 under `files`; components, the
tokenizer and the other parts refer to files by their relative path. Writers go through `BundleWriter`,
which builds the folder under a temporary name beside the target and renames it into place only when the
manifest is complete, so an interrupted export leaves no bundle and no partial folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from osx import __version__
from osx.components import ComponentSpec
from osx.errors import BundleError, OsxError
from osx.files import check_replaceable, make_temp_dir, replace_folder
from osx.manifest import FORMAT, MANIFEST, ComponentEntry, FileEntry, Manifest, dump_manifest, load_manifest
# An ONNX file whose weights exceed this keeps them in one external-data file beside it: protobuf caps a
# message at 2 GiB, and the margin leaves room for the graph itself and the Q/DQ scales calibration adds.
EXTERNAL_DATA_BYTES = 1 << 30


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _walk_files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            yield p


class BundleWriter:
    """Build a bundle in a temp folder beside `out`; `commit(manifest)` checksums and renames it in.

        with BundleWriter(out, force=False) as w:
            (w.dir / "denoiser.onnx").write_bytes(...)
            w.commit(Manifest(...))   # its `files` are filled in here

    Leaving the block without `commit` (an exception, Ctrl-C) removes the temp folder.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False):
        self.out = Path(out).absolute()
        self.force = force
        check_replaceable(self.out, force, ours=is_bundle, what="an osx bundle", option="--out")
        if self.out.is_file():
            raise OsxError(f"{self.out} is a file", hint="choose a folder name for --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir: Path | None = None
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        self.dir = make_temp_dir(f".{self.out.name}.tmp-", self.out.parent)
        return self

    def commit(self, manifest: Manifest) -> Manifest:
        assert self.dir is not None, "use BundleWriter as a context manager"
        files = {p.relative_to(self.dir).as_posix(): FileEntry(sha256_file(p), p.stat().st_size) for p in _walk_files(self.dir)}
        manifest = manifest.replace(files=files, created_by=f"osx {__version__}")
        manifest = Manifest.from_dict(manifest.to_dict(), self.dir / MANIFEST)  # the schema check every reader applies
        for ref in manifest.referenced_files():  # every referenced file must exist
            if ref not in files:
                raise BundleError(f"manifest refers to {ref!r}, which was not written to the bundle")
        tmp_manifest = self.dir / (MANIFEST + ".tmp")
        tmp_manifest.write_text(dump_manifest(manifest))
        os.replace(tmp_manifest, self.dir / MANIFEST)
        replace_folder(self.dir, self.out)
        self.committed = True
        return manifest

    def __exit__(self, *exc) -> None:
        if not self.committed and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def is_bundle(path: Path) -> bool:
    """`path` is a folder with an osx manifest (what `--force` may replace)."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


class Bundle:
    """A bundle folder read back: the manifest plus helpers. `Bundle.open` checks schema (and files)."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle {root} does not exist", hint="export one with `osx export ... --out DIR`")
        if not (root / MANIFEST).is_file():
            raise BundleError(f"{root} is not a bundle: no {MANIFEST}", hint="point at the folder `osx export --out` wrote")
        bundle = cls(root, load_manifest(root / MANIFEST))
        if verify:
            bundle.verify()
        return bundle

    def verify(self, checksums: bool = True) -> None:
        """Every listed file exists with its size (and sha256); no unlisted files. Raises BundleError."""
        files = self.manifest.files
        for rel, meta in files.items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{self.root}: missing file {rel}", hint="the bundle is incomplete; copy it again or re-export")
            if p.stat().st_size != meta.bytes:
                raise BundleError(f"{self.root}: {rel} has {p.stat().st_size} bytes, manifest says {meta.bytes}",
                                  hint="the file is corrupt or was replaced; re-export or re-copy the bundle")
            if checksums and sha256_file(p) != meta.sha256:
                raise BundleError(f"{self.root}: checksum mismatch for {rel}",
                                  hint="the file is corrupt or was edited; re-export or re-copy the bundle")
        extra = [p.relative_to(self.root).as_posix() for p in _walk_files(self.root)
                 if p.relative_to(self.root).as_posix() not in files]
        if extra:
            raise BundleError(f"{self.root}: files not in the manifest: {extra[:5]}",
                              hint="remove them, or re-export the bundle")
        for ref in self.manifest.referenced_files():
            if ref not in files:
                raise BundleError(f"{self.root}: manifest refers to {ref!r}, which is not checksummed in `files`")

    # --- accessors -------------------------------------------------------------------------------
    @property
    def components(self) -> dict[str, ComponentEntry]:
        return self.manifest.components

    def spec(self, component: str) -> ComponentSpec:
        if component not in self.components:
            raise BundleError(f"{self.root}: bundle has no component {component!r}",
                              hint=f"it has {sorted(self.components)}")
        return self.components[component].io

    def path(self, rel: str) -> Path:
        return self.root / rel

    def model_config(self):
        return self.manifest.model_config()
