"""What `osx export` is asked to do, as typed values (torch-free: the CLI builds them before importing torch).

    WeightFiles(checkpoint=Path("ckpts"), parts={"vae": Path("my-vae.safetensors")})  # or RANDOM_WEIGHTS
    ExportRequest("opensora-v1.2", Path("bundle"), weights, gpu="rtx4070", dtype="plan")

`osx.export.exporter.export_bundle(request)` runs it; `osx calibrate` resolves the same WeightFiles, so a
calibration set and the bundle it quantizes name their weights alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from osx.bundle import EXTERNAL_DATA_BYTES
from osx.errors import OsxError
from osx.families.base import REFERENCE_DTYPES, Family

OPSETS = (18, 19, 20)  # onnxruntime and TensorRT 10 parse these; from 23 on, attention becomes an op onnxruntime rejects


@dataclass(frozen=True)
class WeightFiles:
    """Where a model's weights come from: a checkpoint folder, explicit paths per part (the family's
    WeightSource parts; they win over the folder), or seeded random weights."""

    checkpoint: Path | None = None
    parts: Mapping[str, Path] = field(default_factory=dict)
    random: bool = False

    def resolve(self, family: Family) -> dict[str, Path] | None:
        """{part: path} for `family` (osx.export.checkpoint.resolve_parts), None for random weights. Every
        problem is an OsxError naming the part and the option that passes it."""
        given = {k: Path(v) for k, v in self.parts.items() if v is not None}
        options = {w.part: w.option for w in family.weights}
        foreign = [p for p in given if p not in options]
        if foreign:
            raise OsxError(f"{', '.join('--' + p.replace('_', '-') for p in foreign)}: not a weights part of {family.name}",
                           hint=f"its parts: {', '.join(options.values())}")
        if self.random:
            if self.checkpoint is not None or given:
                raise OsxError(f"--random-weights cannot be combined with --checkpoint/{'/'.join(options.values())}",
                               hint="drop --random-weights to export a checkpoint, or drop the checkpoint paths")
            return None
        if self.checkpoint is None and not given:
            raise OsxError("no weights given", hint=f"pass --checkpoint DIR (holding {', '.join(w.description for w in family.weights if w.required)}), "
                           "or --random-weights")
        from osx.export.checkpoint import resolve_parts

        return resolve_parts(family.weights, self.checkpoint, given)


RANDOM_WEIGHTS = WeightFiles(random=True)


@dataclass(frozen=True)
class ExportRequest:
    """One export: `model` (a name osx.families knows) to a bundle at `out`. See `osx export --help`."""

    model: str
    out: Path
    weights: WeightFiles
    gpu: str = "cpu"  # a shipped profile name, a .toml path, auto, or cpu (onnxruntime at fp32, full ranges)
    dtype: str = "plan"  # fp32, fp16, bf16, plan, or per component "denoiser=fp16,text_encoder=bf16" (exporter.parse_dtypes)
    precision: str = "auto"  # the plan's denoiser precision
    quantize: Any = None  # osx.calibration.apply.QuantizeStep (from the command layer), for int8/fp8 plans
    force: bool = False  # replace `out` if it exists
    opset: int = 18
    portable: bool = False  # version-compatible TensorRT engines
    # components text-to-video does not run, exported too ("vae_encoder"); None: the family's default (the VAE
    # encoder where it takes references: osx.families Family.references)
    with_components: tuple[str, ...] | None = None
    with_sets: tuple[str, ...] = ()  # optional component sets the family declares, "t2i" (osx.families ComponentDecl.optional_set)
    only: tuple[str, ...] = ()  # export only these (a partial bundle)
    external_data_threshold: int = EXTERNAL_DATA_BYTES
    # each component in a process of its own (its memory returned to the OS when it ends); None: those whose
    # checkpoint part is large (osx.export.exporter.OWN_PROCESS_BYTES), as starting one costs seconds
    own_process: bool | None = None
    reference_dtype: str | None = None  # what the reference rounds t, fps and sizes to (None: the model's, as its family declares)
    progress: Callable[[str], None] = field(default=print, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.with_components is not None:
            object.__setattr__(self, "with_components", tuple(self.with_components))
        object.__setattr__(self, "only", tuple(self.only))
        object.__setattr__(self, "with_sets", tuple(self.with_sets))
        if self.reference_dtype not in (None, *REFERENCE_DTYPES):
            raise OsxError(f"unknown --reference-dtype {self.reference_dtype!r}", hint=f"use one of {', '.join(REFERENCE_DTYPES)}")
        if self.opset not in OPSETS:
            raise OsxError(f"--opset {self.opset} is not supported", hint=f"use one of {', '.join(map(str, OPSETS))} "
                           "(onnxruntime and TensorRT 10 parse these; from 23 on, attention becomes an op onnxruntime rejects)")
