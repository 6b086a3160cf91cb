"""Activation shards: `.npz` files of one component's inputs, each array with a leading sample axis.

A shard holds whole samples (one component call each: e.g. the denoiser's x/timestep/y/... at one
step, cond and uncond batched as the runtime calls it). Shards are plain uncompressed `np.savez`
archives, so their size is predictable and the cap is exact; numpy writes zip entries with a fixed
timestamp, so the same arrays give byte-identical files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from osx.errors import OsxError

# Per-array overhead of an uncompressed .npz: zip local header + central directory + zip64 extras
# (~ 150 B with the entry name) plus the .npy header (64-128 B). 512 B per array is a safe bound.
_NPZ_OVERHEAD_PER_ARRAY = 512
_NPZ_OVERHEAD = 128  # end-of-central-directory records


def sample_bytes(sample: dict[str, np.ndarray]) -> int:
    """Upper bound on what `sample` adds to a shard."""
    return sum(a.nbytes + _NPZ_OVERHEAD_PER_ARRAY for a in sample.values())


class ShardWriter:
    """Append samples; whenever the next one would push a shard past `max_bytes`, start a new shard.

    `close()` flushes and returns the shard records `{file, samples, bytes}` (file relative to `root`).
    """

    def __init__(self, root: str | os.PathLike, prefix: str, max_bytes: int):
        self.root, self.prefix, self.max_bytes = Path(root), prefix, int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_bytes = _NPZ_OVERHEAD
        self.records: list[dict] = []

    def add(self, sample: dict[str, np.ndarray]) -> None:
        size = sample_bytes(sample)
        if size + _NPZ_OVERHEAD > self.max_bytes:
            raise OsxError(
                f"one calibration sample of {self.prefix} needs {size / 2**20:.1f} MiB, more than the shard cap "
                f"of {self.max_bytes / 2**20:.1f} MiB",
                hint="raise --shard-mb, or calibrate at a smaller --height/--width/--frames",
            )
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        if self.pending and set(sample) != set(self.pending[0]):
            raise ValueError(f"{self.prefix}: sample keys {sorted(sample)} differ from {sorted(self.pending[0])}")
        self.pending.append(sample)
        self.pending_bytes += size

    def _flush(self) -> None:
        name = f"{self.prefix}-{len(self.records):05d}.npz"
        stacked = {k: np.stack([s[k] for s in self.pending]) for k in self.pending[0]}
        tmp = self.root / f".{name}.tmp"
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **stacked)
        os.replace(tmp, self.root / name)
        self.records.append({"file": name, "samples": len(self.pending), "bytes": (self.root / name).stat().st_size})
        self.pending, self.pending_bytes = [], _NPZ_OVERHEAD

    def close(self) -> list[dict]:
        if self.pending:
            self._flush()
        return self.records


def iter_samples(files: list[Path], names: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield one sample dict at a time, loading one shard at a time (only `names`, if given)."""
    for path in files:
        with np.load(path) as shard:
            keys = names if names is not None else list(shard.files)
            missing = [k for k in keys if k not in shard.files]
            if missing:
                raise OsxError(f"calibration shard {path} lacks inputs {missing}",
                               hint="re-run `osx calibrate` for this model version")
            arrays = {k: shard[k] for k in keys}
        for i in range(len(next(iter(arrays.values())))):
            yield {k: a[i] for k, a in arrays.items()}


class ShardReader:
    """onnxruntime `CalibrationDataReader` protocol (get_next / rewind) over shard files.

    `inputs` {name: numpy dtype name} selects and casts the graph's inputs (an fp16 graph takes the
    float32 activations as float16); None yields every array as stored. ModelOpt also calls `get_first`.
    """

    def __init__(self, files: list[Path], inputs: dict[str, str] | None = None, limit: int | None = None):
        self.files, self.inputs, self.limit = list(files), inputs, limit
        self.rewind()

    def rewind(self) -> None:
        self._it = iter(self._samples())

    def _samples(self):
        names = list(self.inputs) if self.inputs is not None else None
        for i, s in enumerate(iter_samples(self.files, names)):
            if self.limit is not None and i >= self.limit:
                return
            yield s if self.inputs is None else {k: v.astype(self.inputs[k], copy=False) for k, v in s.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def get_first(self) -> dict[str, np.ndarray]:
        return next(iter(self._samples()))

    def __iter__(self):
        return iter(self._samples())

    def __len__(self) -> int:
        return sum(1 for _ in self._samples())
