"""Read, check and write checkpoints: safetensors (single or sharded) and plain torch pickles; find a
model family's parts in a checkpoint folder (`resolve_parts`, driven by the family's WeightSources).

Pickles are only read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain
containers, so a checkpoint can never run code. Every failure is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from osx.errors import CheckpointError
from osx.families.base import WeightSource

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Top-level keys of training checkpoints that wrap the weights, most preferred first (EMA weights are
# what Open-Sora samples with; it saves them as a plain state dict in `ema.pt`).
WRAPPER_KEYS = ("ema", "state_dict_ema", "model_ema", "state_dict", "model", "module")
# Key prefixes of wrapped modules: DDP/DataParallel/EMA wrappers and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, on the CPU, with wrapper levels and prefixes removed.

    `path`: a `.safetensors` file; a `.pth/.pt/.bin/.ckpt` pickle; a sharded checkpoint's `*.index.json`
    (safetensors or pickle shards); or a directory holding one index (safetensors preferred) or a single
    weights file.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path")
    if path.is_dir():
        path = _weights_in_dir(path)
    if path.name.endswith(".index.json"):
        state = _read_sharded(path)
    elif path.suffix == ".safetensors":
        state = _read_safetensors(path)
    elif path.suffix in PICKLE_SUFFIXES:
        state = _unwrap(_read_pickle(path), path)
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {path.suffix!r}",
            hint=f"use a .safetensors file, a *.index.json of shards, or a {'/'.join(PICKLE_SUFFIXES)} pickle",
        )
    return _strip_prefixes(state)


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The tensor names of a `.safetensors` file (its header) or a shard index, without reading any
    tensor; [] for a pickle (its names need the whole file) or a file that cannot be read."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        try:
            return list(json.loads(path.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError):
            return []
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception:  # a damaged file: loading it later names the problem
            return []
    return []


def load_into(
    module: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    recomputable: tuple[str, ...] = ("rope.freqs",),
) -> None:
    """Copy `state_dict` into `module`, requiring an exact match of keys and shapes.

    Keys in `recomputable` (exact, or a trailing `.name` match) are constants the module computes
    itself and may be absent; so may a key whose tensor is tied to another key that is present (T5's
    `encoder.embed_tokens.weight` = `shared.weight`). Otherwise any missing, unexpected or wrong-shape
    key raises CheckpointError listing them and naming `source`. Values are cast to the module's dtypes.
    """
    check_fit(module, {k: tuple(v.shape) for k, v in state_dict.items()}, source, recomputable)
    with torch.no_grad():
        module.load_state_dict(state_dict, strict=False)


def check_fit(module: torch.nn.Module, shapes: dict[str, tuple[int, ...]], source: str,
              recomputable: tuple[str, ...] = ("rope.freqs",), unused_ok: bool = False) -> None:
    """Raise CheckpointError unless the checkpoint's {key: shape} fits `module` exactly (see `load_into`);
    with `unused_ok`, checkpoint keys the module lacks are allowed (a reduced-depth module)."""
    expected = module.state_dict(keep_vars=True)
    aliases = tied_names(module)
    optional = {
        k
        for k in expected
        if any(k == r or k.endswith("." + r) for r in recomputable) or any(a in shapes for a in aliases.get(k, ()))
    }
    missing = [k for k in expected if k not in shapes and k not in optional]
    unexpected = [] if unused_ok else [k for k in shapes if k not in expected]
    wrong = [
        f"{k} (checkpoint {list(v)}, model {list(expected[k].shape)})"
        for k, v in shapes.items()
        if k in expected and tuple(v) != tuple(expected[k].shape)
    ]
    if missing or unexpected or wrong:
        problems = [
            f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
            for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong-shape keys", wrong))
            if items
        ]
        raise CheckpointError(
            f"checkpoint {source} does not fit {type(module).__name__}: " + "; ".join(problems),
            hint="check that the checkpoint belongs to this model and model config (--model)",
        )


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, max_shard_bytes: int | None = None
) -> Path:
    """Write `state_dict` to `path` (e.g. `out/model.safetensors`), or, when it is larger than
    `max_shard_bytes`, to shards `model-00001-of-0000N.safetensors` beside it plus `<name>.index.json`
    (the Hugging Face layout). Every file is written to a temporary name and renamed into place, the
    index last. Tied tensors are stored once. Returns the path to pass to `read_state_dict`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _dedupe(state_dict)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_path = path.with_name(path.name + ".index.json")
    if max_shard_bytes is None or total <= max_shard_bytes:
        _atomic_save(tensors, path)
        index_path.unlink(missing_ok=True)  # a stale sharded layout would shadow the new file
        _remove_stale_shards(path, keep=set())
        return path

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    stem = path.name.removesuffix(".safetensors")
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, path.with_name(name))
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True))
    path.unlink(missing_ok=True)
    _remove_stale_shards(path, keep=set(weight_map.values()))
    return index_path


# --- reading ---------------------------------------------------------------------------------------


def _weights_in_dir(folder: Path) -> Path:
    indexes = sorted(folder.glob("*.index.json"), key=lambda p: (not p.name.endswith(".safetensors.index.json"), p.name))
    if indexes:
        return indexes[0]
    for pattern in ("*.safetensors", *(f"*{s}" for s in PICKLE_SUFFIXES)):
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(
                f"{folder} holds several weight files ({', '.join(p.name for p in found[:5])}) and no *.index.json",
                hint="pass the file to load, or add the index json of the shards",
            )
    raise CheckpointError(f"{folder} holds no checkpoint (*.safetensors, *.index.json, *.pth, *.bin)", hint="check the path")


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a shard index ({e})", hint="expected JSON with a 'weight_map'") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing", hint=f"put {shard} next to the index")
        if shard_path.suffix == ".safetensors":
            state.update(_read_safetensors(shard_path))
        else:
            state.update(_unwrap(_read_pickle(shard_path), shard_path))
    absent = [k for k in weight_map if k not in state]
    if absent:
        raise CheckpointError(
            f"{index_path}: {len(absent)} indexed tensors are not in their shards: {', '.join(absent[:5])}",
            hint="the shards do not belong to this index; download them again",
        )
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})", hint="the file may be truncated; download it again") from None


def _read_pickle(path: Path, mmap: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError for disallowed objects, RuntimeError/EOFError for damaged files
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain tensor checkpoint readable with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            hint="convert it to safetensors in a trusted environment, or re-download it",
        ) from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a pickle: the dict itself, or the first of WRAPPER_KEYS holding one."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors", hint="save model.state_dict()")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    raise CheckpointError(
        f"{path}: no state dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))})",
        hint=f"expected a dict of tensors, or one under one of {', '.join(WRAPPER_KEYS)}",
    )


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def tied_names(module: torch.nn.Module) -> dict[str, list[str]]:
    """For each parameter name, the other names of the same tensor (weight tying)."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: [a for a in group if a != n] for group in names.values() for n in group if len(group) > 1}


# --- writing ---------------------------------------------------------------------------------------


def _dedupe(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each storage once (safetensors refuses shared tensors)."""
    seen: set[tuple] = set()
    out = {}
    for k, t in state_dict.items():
        t = t.detach()
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if ident in seen:
            continue
        seen.add(ident)
        out[k] = t.to("cpu").contiguous()
    return out


def _remove_stale_shards(path: Path, keep: set[str]) -> None:
    """Delete shards of an earlier save to the same name that the new layout does not use."""
    stem = path.name.removesuffix(".safetensors")
    for old in path.parent.glob(f"{stem}-*-of-*.safetensors"):
        if re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors", old.name) and old.name not in keep:
            old.unlink()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --- streaming: one tensor at a time ----------------------------------------------------------------


class CheckpointReader:
    """The tensors of a checkpoint (any layout `read_state_dict` takes), read one at a time.

    Names and shapes come from the safetensors headers (or, for pickles, a memory-mapped
    `torch.load(mmap=True, weights_only=True)` that touches no tensor data). `get(key)` copies one tensor
    out of a fresh mapping that is closed again before it returns, so the pages read do not stay in
    this process's resident set: reading a 19 GB checkpoint tensor by tensor costs one tensor of RAM.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint {path} does not exist", hint="check the path")
        self.source = str(path)
        path = _weights_in_dir(path) if path.is_dir() else path
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path}: not a shard index ({e})", hint="expected JSON with a 'weight_map'") from None
            files = [path.parent / s for s in sorted(set(weight_map.values()))]
        elif path.suffix in (".safetensors", *PICKLE_SUFFIXES):
            files = [path]
        else:
            raise CheckpointError(f"{path}: unknown checkpoint format {path.suffix!r}",
                                  hint="use .safetensors, a *.index.json of shards, or a .pth/.bin pickle")
        self._where: dict[str, tuple[Path, str]] = {}  # key -> (file, key inside the file)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{path}: shard {f.name} is missing", hint=f"put {f.name} next to the index")
            for inner, (shape, dtype) in _tensor_meta(f).items():
                self._where[inner] = (f, inner)
                self._meta[inner] = (shape, dtype)
        stripped = _strip_prefixes(dict.fromkeys(self._where))  # same prefix rules as read_state_dict
        if list(stripped) != list(self._where):
            renamed = dict(zip(stripped, self._where.values()))
            self._meta = dict(zip(stripped, self._meta.values()))
            self._where = renamed

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, copied into memory owned by the caller."""
        if key not in self._where:
            raise CheckpointError(f"checkpoint {self.source} has no tensor {key!r}",
                                  hint="check that the checkpoint belongs to this model and model config (--model)")
        file, inner = self._where[key]
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    return f.get_tensor(inner)
            return _unwrap(_read_pickle(file, mmap=True), file)[inner].clone()
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})", hint="the file may be truncated; download it again") from None


def _tensor_meta(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as f:
                return {k: (tuple(f.get_slice(k).get_shape()), _ST_DTYPES[f.get_slice(k).get_dtype()]) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})", hint="the file may be truncated; download it again") from None
    state = _unwrap(_read_pickle(file, mmap=True), file)
    return {k: (tuple(t.shape), t.dtype) for k, t in state.items()}


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def write_safetensors_streamed(path: str | os.PathLike, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                               make: Callable[[str], torch.Tensor]) -> Path:
    """Write a safetensors file whose tensors are made one at a time by `make(name)` (shape and dtype
    declared up front in `tensors`), so a file larger than RAM can be written. Atomic (temp + rename).

    The layout is safetensors' own: an 8-byte little-endian header length, the JSON header (dtype,
    shape, data_offsets per tensor, 8-byte aligned), then each tensor's bytes in header order."""
    path = Path(path)
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (shape, dtype) in tensors.items():
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, (shape, dtype) in tensors.items():
                t = make(name).to(dtype).contiguous()
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: made shape {tuple(t.shape)}, declared {tuple(shape)}")
                f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


# --- finding a family's parts in a checkpoint folder --------------------------------------------------
# The family declares each part (osx.families.WeightSource): its tensor-name prefixes, file-name words,
# a file its folder must hold. Entries are files of weights or model folders (a folder holding weights
# counts as one entry), searched to FOLDER_DEPTH (ckpts/google/t5-v1_1-xxl/<weights>).

FOLDER_DEPTH = 3
_DISCOVERY_PREFIXES = (*WRAPPER_PREFIXES, "ema.")


def identify_part(keys: list[str], sources: Sequence[WeightSource]) -> str | None:
    """The part whose rule a state dict's tensor names match (the first in declaration order), or None."""
    stripped = list(keys)
    for prefix in _DISCOVERY_PREFIXES:
        stripped = [k.removeprefix(prefix) for k in stripped]
    return next((s.part for s in sources if s.matches(stripped)), None)


def find_parts(folder: str | os.PathLike, sources: Sequence[WeightSource]) -> dict[str, Path]:
    """{part: path} for every part of `sources` found in `folder` (to FOLDER_DEPTH), identified by tensor
    names where they can be read without loading weights (safetensors headers, shard indexes), else (pickles)
    by file name. Two entries for one part are a CheckpointError naming both."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist or is not a folder",
                              hint="pass the folder holding " + ", ".join(s.description for s in sources))
    found: dict[str, Path] = {}
    for entry, keys in _weight_entries(folder, FOLDER_DEPTH):
        part = identify_part(keys, sources) if keys else _by_name(entry, sources)
        if part is None:
            continue
        if part in found:
            source = next(s for s in sources if s.part == part)
            raise CheckpointError(f"{folder} holds two {source.description}: {found[part].relative_to(folder)} and "
                                  f"{entry.relative_to(folder)}", hint=f"keep one, or choose with {source.option} PATH")
        found[part] = entry
    return found


def resolve_parts(sources: Sequence[WeightSource], folder: str | os.PathLike | None = None,
                  paths: Mapping[str, str | os.PathLike] | None = None) -> dict[str, Path]:
    """Every required part of `sources` (and the optional ones found): explicit `paths` win over what
    `folder` holds. A missing part is a CheckpointError naming it and the option that passes it."""
    by_part = {s.part: s for s in sources}
    parts = {k: Path(v) for k, v in (paths or {}).items() if v is not None}
    unknown = sorted(set(parts) - set(by_part))
    if unknown:
        raise CheckpointError(f"unknown checkpoint part(s) {', '.join(unknown)}", hint=f"parts: {', '.join(by_part)}")
    if folder is not None:
        parts = {**find_parts(folder, sources), **parts}
    missing = [s for s in sources if s.required and s.part not in parts]
    if missing:
        released = [f"{s.released_name} ({s.option})" for s in missing if s.released_name]
        if folder is None:
            raise CheckpointError(f"no {', '.join(s.part for s in missing)} weights given",
                                  hint=f"pass --checkpoint DIR (holding {', '.join(s.description for s in sources if s.required)}), or "
                                  + " ".join(f"{s.option} PATH" for s in missing))
        raise CheckpointError(f"checkpoint folder {folder} has no {', '.join(s.description for s in missing)}",
                              hint="put it in the folder (a file or subfolder), or pass "
                              + ", ".join(f"{s.option} PATH" for s in missing)
                              + (f"; released as {', '.join(released)}" if released else ""))
    for part, path in parts.items():
        source = by_part[part]
        if not path.exists():
            raise CheckpointError(f"{source.description} {path} does not exist", hint=f"check the {source.option} path")
        if source.folder_file and not (path.is_dir() and (path / source.folder_file).is_file()):
            raise CheckpointError(f"{source.description} {path} is not a folder with {source.folder_file}",
                                  hint=f"point {source.option} at the folder holding its weights and {source.folder_file}"
                                  + (f" ({source.released_name})" if source.released_name else ""))
    return parts


def _weight_entries(folder: Path, depth: int):
    """(entry, tensor names) of each weights file or model folder under `folder`; names [] for pickles."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            keys = _folder_keys(entry)
            if keys is not None:
                yield entry, keys
            elif depth > 1:
                yield from _weight_entries(entry, depth - 1)
        elif entry.name.endswith(".index.json") or entry.suffix == ".safetensors" or entry.suffix in PICKLE_SUFFIXES:
            yield entry, tensor_names(entry)


def _folder_keys(folder: Path) -> list[str] | None:
    """Tensor names of a model folder (the group read_state_dict(folder) reads: shard indexes, else
    safetensors, else pickles); [] when they cannot be read without loading; None if it holds no weights."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for group in ([p for p in files if p.name.endswith(".index.json")], [p for p in files if p.suffix == ".safetensors"],
                  [p for p in files if p.suffix in PICKLE_SUFFIXES]):
        if group:
            return [k for p in group for k in tensor_names(p)]
    return None


def _by_name(entry: Path, sources: Sequence[WeightSource]) -> str | None:
    name = entry.name.lower()
    return next((s.part for s in sources if any(h in name for h in s.name_hints)), None)
