"""GPU profiles: one TOML per GPU (data only), loaded and validated here.

A profile says what a card is (compute capability, VRAM, what the driver / display / CUDA context keep
for themselves), which precision each component runs at there, which shapes the engines are built for,
and how components share the card. `load_profile("rtx4070")` reads `profiles/rtx4070.toml`;
`load_profile("path/to/mine.toml")` reads a user's own file with the same schema.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from osx.families import component_names, never_fp16, quantizable
from osx.errors import OsxError

HERE = Path(__file__).parent
GIB = 1 << 30

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")
BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}
QUANTIZED = ("int8", "fp8")  # explicit quantization: QDQ graphs from `osx calibrate`
# The lowest compute capability each precision has tensor-core kernels for in TensorRT.
MIN_COMPUTE_CAPABILITY = {"fp32": (0, 0), "fp16": (0, 0), "int8": (7, 5), "bf16": (8, 0), "fp8": (8, 9)}
# Which precisions each component may use at all, as the family declarations say: never fp16 where one
# says so; INT8/FP8 for the quantizable ones (`osx calibrate`, behind the quality gate). No shipped profile
# quantizes the text encoder; a custom profile may.
COMPONENT_PRECISIONS = {
    c: tuple(p for p in PRECISIONS if (p != "fp16" or not never_fp16(c)) and (p not in QUANTIZED or quantizable(c)))
    for c in component_names()
}
# Open-Sora v2.0's t2i2v image step, planned with --with-t2i: Flux.1-dev (a 12B MMDiT, quantizable as the
# denoiser) and its AE decoder; declared here until the family declares them with their export (#20)
COMPONENT_PRECISIONS["t2i_denoiser"] = PRECISIONS
COMPONENT_PRECISIONS["t2i_decoder"] = ("fp32", "bf16", "fp16")
CPU_PRECISIONS = ("fp32", "int8")  # onnxruntime on the CPU: fp32, or the INT8 QDQ graph


@dataclass(frozen=True)
class Bucket:
    """One shape the engines are built for: pixels and frames ("240x426x51")."""

    height: int
    width: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*", str(text))
        if not m:
            raise ValueError(f"{text!r} is not HEIGHTxWIDTHxFRAMES (e.g. \"240x426x51\")")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)))

    def latent(self, model) -> dict[str, int]:
        from osx.models import latent_frames

        ds = model.vae.spatial_downsample
        return {"latent_frames": latent_frames(self.frames, model.vae),
                "latent_height": self.height // ds, "latent_width": self.width // ds}


def _resolution(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"{text!r} is not HEIGHTxWIDTH (e.g. \"240x426\")")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class Profile:
    name: str
    display_name: str
    compute_capability: tuple[int, int] | None  # None: the CPU profile
    vram_gib: float  # what the card reports (0 for the CPU profile: host RAM is not planned)
    reserve_gib: float  # CUDA context, driver, display, fragmentation: not ours to plan with
    workspace_gib: float  # TensorRT builder workspace (tactic scratch) limit
    load_one_at_a_time: bool
    precision: dict[str, str]  # component -> fp32 | bf16 | fp16 | int8 | fp8
    buckets: tuple[Bucket, ...]  # shapes the engines are built for (none for the CPU profile)
    cfg_batching: bool = True  # cond + uncond in one denoiser call (batch 2) rather than two calls
    dynamic_shapes: bool = False  # one wide optimisation profile instead of static shape buckets
    cpu_components: tuple[str, ...] = ()  # components run by onnxruntime on the CPU (e.g. T5 on 8 GB cards)
    match: tuple[str, ...] = ()  # regexes on the lower-cased NVML device name, for --gpu auto
    source: str = ""
    pcie_gbps: float | None = None  # host-to-device bandwidth (GB/s, pinned memory): the cost of weight streaming
    weight_streaming: bool = False  # TensorRT weight streaming: engines built streamable, weights partly on the host
    families: dict[str, "Profile"] = dataclasses.field(default_factory=dict)  # a model family's own settings
    family: str | None = None  # set on those: the family they are for

    def for_family(self, family: str) -> "Profile | None":
        """The settings for a model family: its [family."NAME"] table over these, or these for the family
        the top level describes (Open-Sora v1.2); None when the profile has none for `family`."""
        if family in self.families:
            return self.families[family]
        return self if family == (self.family or "opensora-v1.2") else None

    @property
    def is_cpu(self) -> bool:
        return self.compute_capability is None

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.is_cpu else "tensorrt"

    @property
    def cc_text(self) -> str:
        return "cpu" if self.is_cpu else "%d.%d" % self.compute_capability

    @property
    def budget_bytes(self) -> int:
        """VRAM a plan may use: what the card has less the reserve (0 = unplanned, the CPU profile)."""
        return max(0, int((self.vram_gib - self.reserve_gib) * GIB)) if not self.is_cpu else 0

    def with_changes(self, **changes) -> "Profile":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["compute_capability"] = self.cc_text
        d["buckets"] = [b.name for b in self.buckets]
        d["families"] = {name: f.to_dict() for name, f in self.families.items()}
        return d


# --- precision policy ---------------------------------------------------------------------------------


def allowed_precisions(component: str, compute_capability: tuple[int, int] | None) -> tuple[str, ...]:
    """Precisions `component` may run at on a device of this compute capability (None = CPU)."""
    if compute_capability is None:
        return tuple(p for p in CPU_PRECISIONS if p in COMPONENT_PRECISIONS[component])
    return tuple(p for p in COMPONENT_PRECISIONS[component] if compute_capability >= MIN_COMPUTE_CAPABILITY[p])


def check_precision(component: str, precision: str, profile: Profile) -> None:
    if precision not in PRECISIONS:
        raise OsxError(f"unknown precision {precision!r} for {component}", hint=f"use one of {', '.join(PRECISIONS)}")
    allowed = allowed_precisions(component, profile.compute_capability)
    if precision in allowed:
        return
    if precision not in COMPONENT_PRECISIONS[component]:
        why = never_fp16(component) or "only the text encoder and the denoiser are calibrated for INT8/FP8"
        raise OsxError(f"{component} cannot run at {precision}: {why}", hint=f"{component} supports {', '.join(allowed)} on {profile.name}")
    if profile.is_cpu:
        raise OsxError(f"{precision} is not available on the CPU profile", hint=f"the CPU runs {', '.join(allowed)}")
    need = "%d.%d" % MIN_COMPUTE_CAPABILITY[precision]
    raise OsxError(
        f"{precision} needs compute capability >= {need}; {profile.name} has {profile.cc_text}",
        hint=f"{component} on {profile.name} can use {', '.join(allowed)}",
    )


# --- loading ----------------------------------------------------------------------------------------


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name ("rtx4070", "cpu", ...) or a user's TOML file by path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise OsxError(f"profile file {path} does not exist", hint="pass a shipped profile name or an existing .toml file")
    else:
        path = HERE / f"{text.lower()}.toml"
        if not path.is_file():
            raise OsxError(f"unknown GPU profile {text!r}",
                           hint=f"known profiles: {', '.join(shipped_profiles())}; or pass a path to your own .toml, or --gpu auto")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OsxError(f"{path}: not valid TOML: {e}", hint="fix the file (see profiles/rtx4070.toml for the schema)") from None
    return profile_from_dict(data, source=str(path))


_KEYS = {"name", "display_name", "compute_capability", "vram_gib", "reserve_gib", "workspace_gib",
         "load_one_at_a_time", "precision", "shapes", "cpu_components", "match", "pcie_gbps", "weight_streaming", "family"}
# What a [family."NAME"] table may set (the card's own facts stay at the top level).
_FAMILY_KEYS = {"workspace_gib", "load_one_at_a_time", "precision", "shapes", "cpu_components", "weight_streaming"}
_SHAPE_KEYS = {"resolutions", "frames", "buckets", "cfg_batching", "dynamic"}


def profile_from_dict(data: dict, source: str = "<dict>", family: str | None = None) -> Profile:
    """Validate one profile's TOML content; every error names the file and the field."""

    def bad(field_name: str, problem: str) -> OsxError:
        return OsxError(f"{source}: field {field_name!r} {problem}", hint="see profiles/rtx4070.toml for the schema")

    def get(d: dict, key: str, types, where: str = "", required: bool = True, default=None):
        if key not in d:
            if required:
                raise bad(where + key, "is missing")
            return default
        v = d[key]
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            raise bad(where + key, f"must be {types}, got {v!r}")
        if not isinstance(v, types):
            raise bad(where + key, f"has the wrong type ({type(v).__name__}: {v!r})")
        return v

    unknown = set(data) - _KEYS
    if unknown:
        raise bad(sorted(unknown)[0], f"is not a profile field (fields: {', '.join(sorted(_KEYS))})")
    name = get(data, "name", str)
    cc_text = get(data, "compute_capability", str)
    if cc_text == "cpu":
        cc = None
    elif m := re.fullmatch(r"(\d+)\.(\d+)", cc_text):
        cc = (int(m.group(1)), int(m.group(2)))
    else:
        raise bad("compute_capability", f"must be \"MAJOR.MINOR\" (e.g. \"8.9\") or \"cpu\", got {cc_text!r}")
    vram = float(get(data, "vram_gib", (int, float), required=cc is not None, default=0))
    reserve = float(get(data, "reserve_gib", (int, float), required=False, default=0 if cc is None else 1.0))
    workspace = float(get(data, "workspace_gib", (int, float), required=False, default=0 if cc is None else 1.0))
    if cc is not None and not (0 < vram and 0 <= reserve < vram and 0 <= workspace < vram):
        raise bad("vram_gib", f"/ reserve_gib / workspace_gib must satisfy 0 <= reserve, workspace < vram (got {vram}, {reserve}, {workspace})")

    precision = get(data, "precision", dict)
    for comp, p in precision.items():
        if comp not in COMPONENT_PRECISIONS:
            raise bad(f"precision.{comp}", f"is not a component ({', '.join(COMPONENT_PRECISIONS)})")
        if p not in PRECISIONS:
            raise bad(f"precision.{comp}", f"must be one of {', '.join(PRECISIONS)}, got {p!r}")
    for comp in ("text_encoder", "denoiser", "vae_decoder"):
        if comp not in precision:
            raise bad(f"precision.{comp}", "is missing")

    shapes = get(data, "shapes", dict, required=False, default={})
    if set(shapes) - _SHAPE_KEYS:
        raise bad("shapes." + sorted(set(shapes) - _SHAPE_KEYS)[0], f"is not a shapes field ({', '.join(sorted(_SHAPE_KEYS))})")
    # Either explicit buckets, or every resolution with every frame count.
    if "buckets" in shapes and ({"resolutions", "frames"} & set(shapes)):
        raise bad("shapes.buckets", "cannot be combined with shapes.resolutions / shapes.frames")
    try:
        if "buckets" in shapes:
            buckets = tuple(Bucket.parse(b) for b in get(shapes, "buckets", list, "shapes."))
        else:
            resolutions = [_resolution(r) for r in get(shapes, "resolutions", list, "shapes.", required=cc is not None, default=[])]
            frames = get(shapes, "frames", list, "shapes.", required=cc is not None, default=[])
            if any(not isinstance(f, int) or isinstance(f, bool) for f in frames):
                raise ValueError(f"frames must be integers, got {frames}")
            buckets = tuple(Bucket(h, w, f) for h, w in resolutions for f in frames)
    except ValueError as e:
        raise bad("shapes", str(e)) from None
    if any(min(b.height, b.width, b.frames) < 1 for b in buckets):
        raise bad("shapes", "sizes and frame counts must be positive")
    if cc is not None and not buckets:
        raise bad("shapes", "needs at least one bucket (resolutions x frames, or buckets)")
    if len(set(buckets)) != len(buckets):
        raise bad("shapes", "lists a bucket twice")
    cpu_components = tuple(get(data, "cpu_components", list, required=False, default=[]))
    for comp in cpu_components:
        if comp not in precision:
            raise bad("cpu_components", f"names {comp!r}, which has no precision entry")
    pcie = get(data, "pcie_gbps", (int, float), required=False, default=None)
    if pcie is not None and not pcie > 0:
        raise bad("pcie_gbps", f"must be a positive number of GB/s, got {pcie}")
    families = {}
    for fam, table in get(data, "family", dict, required=False, default={}).items():
        if not isinstance(table, dict) or set(table) - _FAMILY_KEYS:
            raise bad(f"family.{fam}", f"must be a table of {', '.join(sorted(_FAMILY_KEYS))}")
        merged = {k: v for k, v in data.items() if k != "family"} | table
        families[fam] = profile_from_dict(merged, source=f'{source} [family."{fam}"]', family=fam)
    match = tuple(get(data, "match", list, required=False, default=[]))
    for pattern in match:
        try:
            re.compile(pattern)
        except re.error as e:
            raise bad("match", f"has a bad regex {pattern!r}: {e}") from None

    profile = Profile(
        name=name,
        display_name=get(data, "display_name", str, required=False, default=name),
        compute_capability=cc,
        vram_gib=vram,
        reserve_gib=reserve,
        workspace_gib=workspace,
        load_one_at_a_time=get(data, "load_one_at_a_time", bool, required=False, default=True),
        precision=dict(precision),
        buckets=buckets,
        cfg_batching=get(shapes, "cfg_batching", bool, "shapes.", required=False, default=True),
        dynamic_shapes=get(shapes, "dynamic", bool, "shapes.", required=False, default=cc is None),
        cpu_components=cpu_components,
        match=match,
        source=source,
        pcie_gbps=None if pcie is None else float(pcie),
        weight_streaming=get(data, "weight_streaming", bool, required=False, default=False),
        families=families,
        family=family,
    )
    for comp, p in precision.items():
        on_cpu = profile.with_changes(compute_capability=None) if comp in cpu_components else profile
        try:
            check_precision(comp, p, on_cpu)
        except OsxError as e:
            raise bad(f"precision.{comp}", f"is not allowed: {e.message}") from None
    return profile
