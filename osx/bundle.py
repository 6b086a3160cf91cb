"""The bundle: the only contract between export and runtime.

A bundle is a folder with `manifest.json` at its root. The manifest is versioned (`format_version`) and
lists every other file in the folder with its size and sha256 under `files`; components, the tokenizer
and the other parts refer to files by their relative path. Writers go through `BundleWriter`, which
builds the folder under a temporary name beside the target and renames it into place only when the
manifest is complete, so an interrupted export leaves no bundle and no partial folder.

Manifest (format_version 1):
    format: "osx-bundle", format_version: 1, created_by: "osx X.Y.Z"
    model:      {name, family, config: ModelConfig.to_dict()}
    components: {name: {file, precision, backend, io: ComponentSpec.to_dict(), ...stage-specific keys}}
    tokenizer:  {file, max_length}
    scheduler:  SchedulerConfig as dict
    profile:    the GPU profile / plan the bundle was built for (may be empty for plain ONNX exports)
    build:      versions of osx / torch / onnx / ... used
    files:      {relative path: {sha256, bytes}}   (every file except manifest.json)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from osx import __version__
from osx.components import ComponentSpec
from osx.errors import BundleError, OsxError
from osx.files import check_replaceable, make_temp_dir, replace_folder

FORMAT = "osx-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# An ONNX file whose weights exceed this keeps them in one external-data file beside it: protobuf caps a
# message at 2 GiB, and the margin leaves room for the graph itself and the Q/DQ scales calibration adds.
EXTERNAL_DATA_BYTES = 1 << 30
REQUIRED_KEYS = ("format", "format_version", "model", "components", "tokenizer", "scheduler", "files")


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
            w.commit({...manifest without "files"...})

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

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        assert self.dir is not None, "use BundleWriter as a context manager"
        files = {p.relative_to(self.dir).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                 for p in _walk_files(self.dir)}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"osx {__version__}",
                    **manifest, "files": files}
        _check_schema(manifest, self.dir)
        for part in ("components", "tokenizer"):  # every referenced file must exist
            for ref in _referenced_files(manifest, part):
                if ref not in files:
                    raise BundleError(f"manifest refers to {ref!r}, which was not written to the bundle")
        tmp_manifest = self.dir / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
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


def _referenced_files(manifest: dict, part: str) -> list[str]:
    if part == "tokenizer":
        return [manifest["tokenizer"]["file"]]
    refs = []
    for comp in manifest["components"].values():
        # "file" and every "*_file" key (e.g. "data_file", "null_text_file") name a file in the bundle
        refs += [v for k, v in comp.items() if (k == "file" or k.endswith("_file")) and v]
        refs += [e["file"] for e in comp.get("engines", [])]
    return refs


def _check_schema(manifest: dict, where: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{where / MANIFEST}: manifest lacks {missing}", hint="re-export the bundle with `osx export`")
    if manifest["format"] != FORMAT:
        raise BundleError(f"{where}: not an osx bundle (format={manifest['format']!r})")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {manifest['format_version']} is not supported (this osx reads {FORMAT_VERSION})",
            hint="re-export the bundle with this osx version, or install the osx version that wrote it "
            f"({manifest.get('created_by', 'unknown')})",
        )
    for name, comp in manifest["components"].items():
        for key in ("file", "precision", "io"):
            if key not in comp:
                raise BundleError(f"{where / MANIFEST}: component {name!r} lacks {key!r}")


class Bundle:
    """A bundle folder read back: the manifest plus helpers. `Bundle.open` checks schema (and files)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Bundle":
        root = Path(path)
        if not root.exists():
            raise BundleError(f"bundle {root} does not exist", hint="export one with `osx export ... --out DIR`")
        if not (root / MANIFEST).is_file():
            raise BundleError(f"{root} is not a bundle: no {MANIFEST}", hint="point at the folder `osx export --out` wrote")
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{root / MANIFEST} is not valid JSON: {e}", hint="the bundle is corrupt; re-export it") from None
        if not isinstance(manifest, dict):
            raise BundleError(f"{root / MANIFEST} is not a JSON object", hint="the bundle is corrupt; re-export it")
        _check_schema(manifest, root)
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self, checksums: bool = True) -> None:
        """Every listed file exists with its size (and sha256); no unlisted files. Raises BundleError."""
        files = self.manifest["files"]
        for rel, meta in files.items():
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{self.root}: missing file {rel}", hint="the bundle is incomplete; copy it again or re-export")
            if p.stat().st_size != meta["bytes"]:
                raise BundleError(f"{self.root}: {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}",
                                  hint="the file is corrupt or was replaced; re-export or re-copy the bundle")
            if checksums and sha256_file(p) != meta["sha256"]:
                raise BundleError(f"{self.root}: checksum mismatch for {rel}",
                                  hint="the file is corrupt or was edited; re-export or re-copy the bundle")
        extra = [p.relative_to(self.root).as_posix() for p in _walk_files(self.root)
                 if p.relative_to(self.root).as_posix() not in files]
        if extra:
            raise BundleError(f"{self.root}: files not in the manifest: {extra[:5]}",
                              hint="remove them, or re-export the bundle")
        for part in ("components", "tokenizer"):
            for ref in _referenced_files(self.manifest, part):
                if ref not in files:
                    raise BundleError(f"{self.root}: manifest refers to {ref!r}, which is not checksummed in `files`")

    # --- accessors -------------------------------------------------------------------------------
    @property
    def components(self) -> dict[str, dict]:
        return self.manifest["components"]

    def spec(self, component: str) -> ComponentSpec:
        if component not in self.components:
            raise BundleError(f"{self.root}: bundle has no component {component!r}",
                              hint=f"it has {sorted(self.components)}")
        return ComponentSpec.from_dict(self.components[component]["io"])

    def path(self, rel: str) -> Path:
        return self.root / rel

    def model_config(self):
        from osx.models import ModelConfig

        return ModelConfig.from_dict(self.manifest["model"]["config"])
