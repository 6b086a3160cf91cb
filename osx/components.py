"""One declaration per component: names, dtypes, symbolic shapes, dynamic ranges, sample inputs.

Export (torch.onnx dynamic axes), validation, calibration, TensorRT optimisation profiles, the bundle
manifest and the runtime's input checks all read these specs; nothing else states a component's I/O.
Torch-free: the runtime rebuilds the specs from the manifest with `ComponentSpec.from_dict`. Each
family declares its components' specs (osx.families); this module is the machinery they share.

Shapes are tuples of ints (fixed) and strings: a dimension name ("batch"), or "k*name" (an exact
multiple, e.g. the VAE's 4x temporal upsampling). A name listed in `dims` has a min/opt/max range;
a name not listed (an output's free dimension) is only known after running.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import numpy as np

from osx.errors import InputError

FLOAT = "float"  # placeholder dtype: the component's float precision (float32 / float16 / bfloat16)

@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"bad range min={self.min} opt={self.opt} max={self.max}")

    def contains(self, n: int) -> bool:
        return self.min <= n <= self.max


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # FLOAT, "float32", "int64"
    shape: tuple[int | str, ...]
    # How to make a plausible sample (validation / calibration fallbacks):
    #   "normal" | "uniform:LO:HI" | "tokens" | "prefix_mask" | "const:V" | "pixels:DIM" (8 px per latent)
    sample: str = "normal"
    doc: str = ""


_MULT = re.compile(r"^(\d+)\*([a-z_]+)$")


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange]
    float_dtype: str = "float32"
    vocab_size: int = 0  # for "tokens" samples (text encoder)

    # --- shapes ----------------------------------------------------------------------------------
    def dtype_of(self, t: TensorSpec) -> str:
        return self.float_dtype if t.dtype == FLOAT else t.dtype

    def resolve(self, t: TensorSpec, sizes: dict[str, int]) -> tuple[int | None, ...]:
        """Concrete shape of `t` for the given dimension sizes (None where not determined)."""
        out: list[int | None] = []
        for d in t.shape:
            if isinstance(d, int):
                out.append(d)
            elif d in sizes:
                out.append(int(sizes[d]))
            elif (m := _MULT.match(d)) and m.group(2) in sizes:
                out.append(int(m.group(1)) * int(sizes[m.group(2)]))
            else:
                out.append(None)
        return tuple(out)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's `dynamic_axes`: every non-int dimension of every tensor."""
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d.replace("*", "x") for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def sizes_of(self, arrays: dict[str, np.ndarray]) -> dict[str, int]:
        """Read the dimension sizes off concrete input arrays (and check fixed dims and consistency)."""
        sizes: dict[str, int] = {}
        for t in self.inputs:
            if t.name not in arrays:
                raise InputError(f"{self.name}: missing input {t.name!r}", hint=f"inputs: {[i.name for i in self.inputs]}")
            shape = arrays[t.name].shape
            if len(shape) != len(t.shape):
                raise InputError(f"{self.name}.{t.name}: expected rank {len(t.shape)} {t.shape}, got shape {shape}")
            for d, n in zip(t.shape, shape):
                if isinstance(d, int):
                    if d != n:
                        raise InputError(f"{self.name}.{t.name}: expected shape {t.shape}, got {shape}")
                else:
                    name, k = d, 1
                    if m := _MULT.match(d):
                        name, k = m.group(2), int(m.group(1))
                        if n % k:
                            raise InputError(f"{self.name}.{t.name}: {d} must be a multiple of {k}, got {n}")
                    if name in self.dims and sizes.setdefault(name, n // k) != n // k:
                        raise InputError(f"{self.name}: dimension {name!r} is {sizes[name]} in one input and {n // k} in {t.name!r}")
        return sizes

    def check(self, sizes: dict[str, int]) -> None:
        """Raise InputError naming the dimension and its allowed range if any size is outside it."""
        for d, n in sizes.items():
            r = self.dims.get(d)
            if r is not None and not r.contains(n):
                raise InputError(
                    f"{self.name}: {d}={n} is outside the supported range {r.min}..{r.max}",
                    hint="pick a size inside the range, or re-export the bundle with a profile that covers it",
                )

    def with_dims(self, **ranges: DimRange) -> "ComponentSpec":
        unknown = set(ranges) - set(self.dims)
        if unknown:
            raise KeyError(f"{self.name} has no dims {sorted(unknown)}; it has {sorted(self.dims)}")
        return dataclasses.replace(self, dims={**self.dims, **ranges})

    def with_precision(self, float_dtype: str) -> "ComponentSpec":
        return dataclasses.replace(self, float_dtype=float_dtype)

    # --- sample inputs ---------------------------------------------------------------------------
    def sample_inputs(self, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Plausible random inputs at `sizes` (default: each dim's opt)."""
        sizes = {**{d: r.opt for d, r in self.dims.items()}, **(sizes or {})}
        self.check(sizes)
        rng = np.random.default_rng(seed)
        out = {}
        for t in self.inputs:
            shape = self.resolve(t, sizes)
            dtype = np.dtype(self.dtype_of(t)) if self.dtype_of(t) != "bfloat16" else np.float32
            kind, *args = t.sample.split(":")
            if kind == "normal":
                a = rng.standard_normal(shape)
            elif kind == "uniform":
                a = rng.uniform(float(args[0]), float(args[1]), shape)
            elif kind == "const":
                a = np.full(shape, float(args[0]))
            elif kind == "pixels":
                a = np.full(shape, 8 * sizes[args[0]])
            elif kind == "tokens":
                a = rng.integers(2, max(self.vocab_size, 3), shape)
            elif kind == "prefix_mask":  # each row: a random number (>= 1) of ones, then zeros
                lengths = rng.integers(1, shape[-1] + 1, shape[:-1])
                a = (np.arange(shape[-1]) < lengths[..., None]).astype(np.int64)
            else:
                raise ValueError(f"unknown sample kind {t.sample!r}")
            out[t.name] = np.ascontiguousarray(a, dtype=dtype)
        if "input_ids" in out and "attention_mask" in out:  # padded positions carry the pad id 0
            out["input_ids"] = out["input_ids"] * out["attention_mask"]
        return out

    # --- manifest --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "float_dtype": self.float_dtype,
            "vocab_size": self.vocab_size,
            "inputs": [_tensor_dict(t, self) for t in self.inputs],
            "outputs": [_tensor_dict(t, self) for t in self.outputs],
            "dims": {d: dataclasses.asdict(r) for d, r in self.dims.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ComponentSpec":
        def tensors(items):
            return tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), t.get("sample", "normal"), t.get("doc", ""))
                for t in items
            )

        return cls(
            name=d["name"],
            inputs=tensors(d["inputs"]),
            outputs=tensors(d["outputs"]),
            dims={k: DimRange(**v) for k, v in d["dims"].items()},
            float_dtype=d["float_dtype"],
            vocab_size=d.get("vocab_size", 0),
        )


def _tensor_dict(t: TensorSpec, spec: ComponentSpec) -> dict:
    return {"name": t.name, "dtype": spec.dtype_of(t), "shape": list(t.shape), "sample": t.sample, "doc": t.doc}
