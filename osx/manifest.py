"""The bundle manifest as typed objects: the only contract between export and runtime.

    Manifest.from_dict(d, where)   schema check (a BundleError naming the bad field) -> typed manifest
    manifest.to_dict()             -> the JSON object `manifest.json` holds
    load_manifest(path) / dump_manifest(manifest) -> read / the JSON text

Format version 2 (version 1 is read and upgraded: its `profile` section becomes `plan` and `runtime`):
    format: "osx-bundle", format_version: 2, created_by: "osx X.Y.Z"
    model:      {name, family, config}
    components: {name: ComponentEntry}: file, precision, backend, io (I/O spec and ranges), onnx_dims (the
                ranges the ONNX graph was exported over), named files (data_file, null_text_file, onnx_files),
                onnxruntime_file (the graph fused for onnxruntime, NAME.ort.onnx),
                engines (EngineEntry: file, complete key with the buckets and shape profiles it was built
                for, onnx_file, runtime package, load_one_at_a_time), plus stage reports kept verbatim
    tokenizer:  {file, max_length} of the (first) text encoder's tokenizer; with several text encoders also
                `encoders`: {component: {file, max_length, pad_token}} (the family's PromptDecl)
    scheduler:  the family's sampler settings
    runtime:    RuntimeSettings the runtime reads for ONNX components (engines carry their own)
    plan:       the planner's report of the export, for people; the runtime never reads it
    build, export, quantization: provenance (versions, options, gate report)
    files:      {relative path: {sha256, bytes}} for every file but manifest.json
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from osx.components import ComponentSpec, DimRange
from osx.consistency import check_manifest
from osx.engine_key import key_profiles
from osx.errors import BundleError
from osx.families import config_from_manifest

FORMAT = "osx-bundle"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
REEXPORT = "re-export the bundle with `osx export`"
_BUCKET = re.compile(r"^(\d+)x(\d+)x(\d+)$")  # profiles' bucket names: HEIGHTxWIDTHxFRAMES


class _Reader:
    """Field access with a BundleError that names the field (`components.denoiser.precision`)."""

    def __init__(self, d: Any, path: str, where: str):
        if not isinstance(d, dict):
            raise BundleError(f"{where}: manifest field {path or '(root)'} must be an object, got {type(d).__name__}", hint=REEXPORT)
        self.d, self.path, self.where = d, path, where

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type | tuple, default: Any = ...) -> Any:
        if key not in self.d:
            if default is ...:
                raise BundleError(f"{self.where}: manifest lacks {self._name(key)}", hint=REEXPORT)
            return default
        value = self.d[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise BundleError(f"{self.where}: manifest field {self._name(key)} must be {names}, got {value!r:.60}", hint=REEXPORT)
        return value

    def sub(self, key: str, default: Any = ...) -> "_Reader":
        return _Reader(self.get(key, dict, default), self._name(key), self.where)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class EngineEntry:
    """One TensorRT engine of a component: the key says what it needs and which shapes it runs."""

    file: str
    key: dict  # osx.engine_key.engine_key(): everything the engine depends on, its buckets and profiles, its id
    onnx_file: str | None = None  # the graph it was built from
    runtime: str = "tensorrt"  # the TensorRT runtime package that loads it
    load_one_at_a_time: bool = False  # the plan it was built under: release each component after its stage
    report: dict = field(default_factory=dict)  # build seconds, bytes, ...

    def profiles(self) -> list[dict[str, DimRange]]:
        return key_profiles(self.key)

    def same_target(self, other: "EngineEntry") -> bool:
        keys = ("compute_capability", "tensorrt_version", "hardware_compatibility", "version_compatible", "precision")
        return all(self.key.get(k) == other.key.get(k) for k in keys)

    def buckets(self) -> list[tuple[int, int, int]]:
        """(height, width, frames) of every bucket the engine was built for ([] if none were named)."""
        return [tuple(int(x) for x in m.groups()) for name in self.key.get("buckets", {}) if (m := _BUCKET.match(name))]

    def to_dict(self) -> dict:
        return {"file": self.file, "key": self.key, "onnx_file": self.onnx_file, "runtime": self.runtime,
                "load_one_at_a_time": self.load_one_at_a_time, **self.report}

    @classmethod
    def from_dict(cls, r: _Reader) -> "EngineEntry":
        key = r.sub("key")
        for name, kind in (("id", str), ("compute_capability", str), ("tensorrt_version", str), ("hardware_compatibility", str),
                           ("version_compatible", bool), ("profiles", list), ("buckets", dict)):
            key.get(name, kind)
        known = ("file", "key", "onnx_file", "runtime", "load_one_at_a_time")
        return cls(r.get("file", str), key.d, r.get("onnx_file", (str, type(None)), None), r.get("runtime", str, "tensorrt"),
                   r.get("load_one_at_a_time", bool, False), {k: v for k, v in r.d.items() if k not in known})


@dataclass(frozen=True)
class ComponentEntry:
    file: str
    precision: str
    io: ComponentSpec  # the I/O spec with the ranges this bundle was planned for
    backend: str = "onnxruntime"
    onnx_dims: dict[str, DimRange] | None = None  # the ranges the ONNX graph itself takes (export's full ranges)
    files: dict[str, str] = field(default_factory=dict)  # named files: data_file, null_text_file, ...
    onnx_files: dict[str, str] = field(default_factory=dict)  # further graphs by precision (the float one of a QDQ)
    calibration_hash: str | None = None  # the calibration set a Q/DQ graph was calibrated on
    # the graph fused for onnxruntime (NAME.ort.onnx beside the portable `file`); OrtBackend runs it unless
    # its providers are TensorRT's. Its validation report is `report["onnxruntime_graph"]`.
    onnxruntime_file: str | None = None
    engines: tuple[EngineEntry, ...] = ()
    report: dict = field(default_factory=dict)  # validation, op counts, notes, quantization: kept verbatim

    def file_of(self, role: str) -> str | None:
        """A named file ("data_file", "null_text_file") or None."""
        return self.files.get(role)

    def referenced_files(self) -> list[str]:
        fused = [self.onnxruntime_file] if self.onnxruntime_file else []
        return [self.file, *self.files.values(), *fused, *self.onnx_files.values(), *(e.file for e in self.engines)]

    def with_engine(self, engine: EngineEntry) -> "ComponentEntry":
        """This entry with `engine` added, replacing one built for the same target (GPU architecture, TensorRT
        version, compatibility level, precision); engines for other targets are kept. The typed graph the
        engine was built from is listed in `onnx_files` (so later builds reuse it and the runtime checks it)."""
        kept = tuple(e for e in self.engines if not engine.same_target(e))
        onnx_files = dict(self.onnx_files)
        if engine.onnx_file and engine.onnx_file != self.file and engine.onnx_file not in onnx_files.values():
            onnx_files[engine.key["precision"]] = engine.onnx_file
        return dataclasses.replace(self, engines=kept + (engine,), backend="tensorrt", onnx_files=onnx_files)

    def to_dict(self) -> dict:
        d = {"file": self.file, "precision": self.precision, "backend": self.backend, "io": self.io.to_dict(), **self.files}
        if self.onnx_dims is not None:
            d["onnx_dims"] = {k: dataclasses.asdict(r) for k, r in self.onnx_dims.items()}
        if self.onnx_files:
            d["onnx_files"] = dict(self.onnx_files)
        if self.calibration_hash is not None:
            d["calibration_hash"] = self.calibration_hash
        if self.onnxruntime_file is not None:
            d["onnxruntime_file"] = self.onnxruntime_file
        if self.engines:
            d["engines"] = [e.to_dict() for e in self.engines]
        return {**d, **self.report}

    @classmethod
    def parse(cls, d: dict, name: str = "component") -> "ComponentEntry":
        """A component entry from its manifest form (the schema check of `Manifest.from_dict`)."""
        return cls.from_dict(_Reader(d, f"components.{name}", "manifest"))

    @classmethod
    def from_dict(cls, r: _Reader) -> "ComponentEntry":
        try:
            io = ComponentSpec.from_dict(r.get("io", dict))
            dims = r.get("onnx_dims", dict, None)
            onnx_dims = None if dims is None else {k: DimRange(**v) for k, v in dims.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{r.where}: manifest field {r._name('io')} is malformed ({type(e).__name__}: {e})", hint=REEXPORT) from None
        engines = r.get("engines", list, [])
        onnx_files = r.sub("onnx_files", {})
        known = ("file", "precision", "backend", "io", "onnx_dims", "onnx_files", "calibration_hash", "onnxruntime_file", "engines")
        return cls(
            file=r.get("file", str), precision=r.get("precision", str), io=io, backend=r.get("backend", str, "onnxruntime"),
            onnx_dims=onnx_dims,
            files={k: r.get(k, str) for k in r.d if k.endswith("_file") and r.d[k] and k not in known},
            onnx_files={k: onnx_files.get(k, str) for k in onnx_files.d},
            calibration_hash=r.get("calibration_hash", (str, type(None)), None),
            onnxruntime_file=r.get("onnxruntime_file", (str, type(None)), None),
            engines=tuple(EngineEntry.from_dict(_Reader(e, f"{r._name('engines')}[{i}]", r.where)) for i, e in enumerate(engines)),
            report={k: v for k, v in r.d.items() if k not in known and not k.endswith("_file")},
        )


@dataclass(frozen=True)
class RuntimeSettings:
    """How the runtime runs the ONNX components of this bundle (TensorRT engines carry their own)."""

    load_one_at_a_time: bool = False
    cfg_batching: bool = True  # cond + uncond in one denoiser call where its batch range allows


@dataclass(frozen=True)
class Manifest:
    model: dict  # {name, family, config}
    components: dict[str, ComponentEntry]
    tokenizer: dict  # {file, max_length}
    scheduler: dict  # the family's sampler settings
    files: dict[str, FileEntry] = field(default_factory=dict)
    runtime: RuntimeSettings = RuntimeSettings()
    plan: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    quantization: dict | None = None
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    def referenced_files(self) -> list[str]:
        tokenizers = dict.fromkeys([self.tokenizer["file"], *(e["file"] for e in self.tokenizer.get("encoders", {}).values())])
        return [*tokenizers, *(f for c in self.components.values() for f in c.referenced_files())]

    def replace(self, **changes) -> "Manifest":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "format_version": self.format_version, "created_by": self.created_by, "model": self.model,
             "components": {n: c.to_dict() for n, c in self.components.items()}, "tokenizer": self.tokenizer,
             "scheduler": self.scheduler, "runtime": dataclasses.asdict(self.runtime), "plan": self.plan,
             "build": self.build, "export": self.export}
        if self.quantization is not None:
            d["quantization"] = self.quantization
        d["files"] = {rel: dataclasses.asdict(f) for rel, f in self.files.items()}
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str | Path = "manifest") -> "Manifest":
        """Check the schema and build the typed manifest; a BundleError names the field that is wrong."""
        where = str(where)
        r = _Reader(d, "", where)
        if r.get("format", str, None) != FORMAT:
            raise BundleError(f"{where}: not an osx bundle (format={d.get('format')!r})", hint="point at a folder `osx export` wrote")
        version = r.get("format_version", int)
        if version not in READABLE_VERSIONS:
            raise BundleError(f"{where}: bundle format version {version} is not supported (this osx reads {READABLE_VERSIONS})",
                              hint=f"{REEXPORT} of this osx version, or install the osx version that wrote it "
                              f"({d.get('created_by', 'unknown')})")
        if version == 1:  # the planner's report held the runtime settings; engines had none of their own
            profile = r.get("profile", dict, {})
            d = {**d, "plan": profile, "runtime": {k: profile[k] for k in ("load_one_at_a_time", "cfg_batching") if k in profile}}
            r = _Reader(d, "", where)
        model = r.sub("model")
        model.get("name", str), model.get("family", str), model.get("config", dict)
        tokenizer = r.sub("tokenizer")
        tokenizer.get("file", str), tokenizer.get("max_length", int)
        encoders = tokenizer.sub("encoders", {})
        for n in encoders.d:
            encoders.sub(n).get("file", str), encoders.sub(n).get("max_length", int)
        runtime = r.sub("runtime", {})
        files = r.sub("files")
        components = r.sub("components")
        for n in components.d:
            components.sub(n)
        check_manifest(d, where)  # ranges ordered, dtypes known: named before the typed parse below
        manifest = cls(
            model=model.d,
            components={n: ComponentEntry.from_dict(components.sub(n)) for n in components.d},
            tokenizer=tokenizer.d,
            scheduler=r.get("scheduler", dict),
            files={rel: FileEntry(files.sub(rel).get("sha256", str), files.sub(rel).get("bytes", int)) for rel in files.d},
            runtime=RuntimeSettings(runtime.get("load_one_at_a_time", bool, False), runtime.get("cfg_batching", bool, True)),
            plan=r.get("plan", dict, {}),
            build=r.get("build", dict, {}),
            export=r.get("export", dict, {}),
            quantization=r.get("quantization", (dict, type(None)), None),
            created_by=r.get("created_by", str, ""),
            format_version=FORMAT_VERSION,
        )
        if version == 1:  # v1 engines were built under the bundle-wide settings
            manifest = manifest.replace(components={n: dataclasses.replace(c, engines=tuple(
                dataclasses.replace(e, load_one_at_a_time=manifest.runtime.load_one_at_a_time) for e in c.engines))
                for n, c in manifest.components.items()})
        return manifest

    def model_config(self):
        return config_from_manifest(self.model)


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}", hint="the bundle is corrupt; re-export it") from None
    return Manifest.from_dict(d, path)


def dump_manifest(manifest: Manifest) -> str:
    return json.dumps(manifest.to_dict(), indent=2) + "\n"
