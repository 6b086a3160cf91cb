"""Profile + model config -> a plan: precision, optimisation-profile shapes and memory per component.

Memory model (bytes; every term is printed in the plan so a user can check it):
  weights     = matrix values x bytes(precision) + other values x bytes(16-bit or fp32)
                (INT8/FP8 engines keep biases, norms and tables in 16 bits)
  activations = the live tensors of the largest shape the component is built for (formulas below)
  run         = weights + the execution context's device memory: activations + tactic scratch (TensorRT
                bounds a tactic's scratch by the builder workspace, so the workspace is counted whole)
  build       = the same: the builder times tactics with scratch up to the workspace limit
  run peak    = max over components when they are loaded one at a time, else the sum; the VAE encoder
                (image/video references) runs alone, so it counts on its own
  build peak  = the largest single build (engines are built one after another)
The budget is the card's VRAM less the profile's reserve (CUDA context, driver, display).

TensorRT fuses attention (no score matrix is stored) and reuses activation memory between layers, so
the activation terms count the widest set of tensors alive at once, not every intermediate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from osx.components import ComponentSpec, DimRange
from osx.families import component_specs, family_of, never_fp16
from osx.errors import OsxError
from osx.models import ModelConfig
from osx.profiles.params import Params, component_params
from osx.profiles.profile import (
    BYTES_PER_VALUE, GIB, PRECISIONS, QUANTIZED, Bucket, Profile, check_precision,
)

# Live activations per token of the denoiser, in units of hidden_size: the residual stream, the
# modulated input, qkv (3), attention output and the 4x MLP hidden, less what TensorRT frees in between.
DENOISER_LIVE_WIDTH = 12
# The spatial VAE decoder's widest point, read off the exported graph (tests/test_vae_memory.py): the first
# resnet of the last up block holds its input, that input normalised and activated (VAE_LIVE_MAPS maps of the
# width entering the block), and its first conv's output (one map of the block's own width), for every frame
# of the chunk at full resolution: the exported chunk graph decodes all of them in one call.
VAE_LIVE_MAPS = 3


@dataclass
class ComponentPlan:
    name: str
    precision: str
    backend: str  # "tensorrt" | "onnxruntime"
    device: str  # "gpu" | "cpu"
    profiles: list[dict[str, DimRange]]  # optimisation profiles (static buckets: min = opt = max)
    bucket_profile: dict[str, int]  # bucket name -> index into `profiles`
    params: int
    weight_bytes: int
    activation_bytes: int
    workspace_bytes: int
    streamed_bytes: int = 0  # TensorRT weight streaming: weights left in host memory, copied in at every call

    @property
    def strongly_typed(self) -> bool:
        """INT8/FP8 come as explicit-quantization (QDQ) graphs: TensorRT takes their types as given."""
        return self.precision in QUANTIZED

    @property
    def needs_calibration(self) -> bool:
        return self.precision in QUANTIZED

    @property
    def run_bytes(self) -> int:
        return self.weight_bytes - self.streamed_bytes + self.activation_bytes + self.workspace_bytes

    @property
    def build_bytes(self) -> int:
        return self.run_bytes

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "backend": self.backend,
            "device": self.device,
            "strongly_typed": self.strongly_typed,
            "needs_calibration": self.needs_calibration,
            "profiles": [{d: dataclasses.asdict(r) for d, r in p.items()} for p in self.profiles],
            "bucket_profile": dict(self.bucket_profile),
            "memory": {"params": self.params, "weights": self.weight_bytes, "activations": self.activation_bytes,
                       "workspace": self.workspace_bytes, "streamed": self.streamed_bytes, "run": self.run_bytes,
                       "build": self.build_bytes},
        }


@dataclass
class Plan:
    profile: Profile
    model: ModelConfig
    backend: str
    buckets: list[Bucket]
    components: dict[str, ComponentPlan]
    load_one_at_a_time: bool
    cfg_batching: bool
    vae_chunk_latent_frames: int  # the VAE decodes this many latent frames per call
    budget_bytes: int  # 0: not planned against a budget (CPU)
    notes: list[str] = field(default_factory=list)
    host_ram_bytes: int | None = None  # the RAM of the machine that runs the plan, when known (--gpu auto)
    options: dict = field(default_factory=dict)  # a family planner's options it was made with (the fit search reuses them)

    def _run_peak(self, device: str) -> int:
        # components outside the text-to-video pipeline (the VAE encoder of references) run alone: the runtime
        # releases the others first (osx.runtime.pipeline.Pipeline.encode_reference)
        alone = {c.name for c in family_of(self.model).components if not c.in_pipeline}
        values = [c.run_bytes for c in self.components.values() if c.device == device and c.name not in alone]
        together = (max(values) if self.load_one_at_a_time else sum(values)) if values else 0
        return max([together] + [c.run_bytes for c in self.components.values() if c.device == device and c.name in alone])

    @property
    def run_peak_bytes(self) -> int:
        return self._run_peak("gpu")

    @property
    def build_peak_bytes(self) -> int:
        """Engines are built one after another whatever the run policy: the largest single build."""
        return max((c.build_bytes for c in self.components.values() if c.device == "gpu"), default=0)

    @property
    def host_peak_bytes(self) -> int:
        """Host RAM for the components the CPU runs (onnxruntime)."""
        return self._run_peak("cpu")

    @property
    def host_fits(self) -> bool:
        """The CPU components fit this machine's RAM (True when the machine is not known: then the plan
        states the need as a requirement)."""
        return self.host_ram_bytes is None or self.host_peak_bytes <= self.host_ram_bytes

    @property
    def fits(self) -> bool:
        gpu = self.budget_bytes == 0 or max(self.run_peak_bytes, self.build_peak_bytes) <= self.budget_bytes
        return gpu and self.host_fits

    def to_dict(self) -> dict:
        p = self.profile
        return {
            "name": p.name, "display_name": p.display_name, "compute_capability": p.cc_text,
            "vram_gib": p.vram_gib, "reserve_gib": p.reserve_gib, "workspace_gib": p.workspace_gib, "source": p.source,
            "model": self.model.name,
            "backend": self.backend,
            "shapes": "dynamic" if self.profile.dynamic_shapes else "static buckets",
            "buckets": [{"name": b.name, "height": b.height, "width": b.width, "frames": b.frames,
                         **self.latent(b)} for b in self.buckets],
            "load_one_at_a_time": self.load_one_at_a_time,
            "cfg_batching": self.cfg_batching,
            "vae_chunk_latent_frames": self.vae_chunk_latent_frames,
            "vae_spatial_frames_per_call": self.vae_frames_per_call(),
            "components": {n: c.to_dict() for n, c in self.components.items()},
            "memory": {"budget": self.budget_bytes, "run_peak": self.run_peak_bytes,
                       "build_peak": self.build_peak_bytes, "host_peak": self.host_peak_bytes, "fits": self.fits},
            "notes": list(self.notes),
        }

    # what a model family's plan (osx.profiles.planner_v2) computes its own way
    def latent(self, bucket: Bucket) -> dict[str, int]:
        return bucket.latent(self.model)

    def vae_frames_per_call(self) -> int:
        return self.model.vae.temporal_downsample * self.vae_chunk_latent_frames

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --- memory formulas ----------------------------------------------------------------------------------


def outside_qdq_bytes(component: str) -> int:
    """Bytes per value outside Q/DQ in a component's INT8/FP8 graph: 16-bit, but fp32 for the text encoder
    (calibration keeps T5 fp32 outside Q/DQ: it overflows in fp16)."""
    return 4 if never_fp16(component) else 2


def weight_bytes(model: ModelConfig, component: str, precision: str) -> int:
    return params_bytes(component_params(model, component), component, precision)


def params_bytes(p: Params, component: str, precision: str) -> int:
    if precision in QUANTIZED:
        return p.matrix * BYTES_PER_VALUE[precision] + p.other * outside_qdq_bytes(component)
    return p.total * BYTES_PER_VALUE[precision]


def vae_spatial_peak_bytes(model: ModelConfig, frames: int, height: int, width: int, value_bytes: int) -> int:
    """The spatial VAE decoder's widest point for `frames` frames of height x width pixels (VAE_LIVE_MAPS)."""
    channels = model.vae.spatial.block_out_channels
    entering, own = tuple(reversed(channels))[-2], channels[0]
    return frames * height * width * (VAE_LIVE_MAPS * entering + own) * value_bytes


def encoder_activation_bytes(batch: int, length: int, width: int, inner: int, ff: int, heads: int, e: int) -> int:
    """A text transformer at `length` tokens: residual and normed input, q/k/v, two feed-forward maps; and
    its float32 attention scores (T5 adds its relative position bias to them, so they are kept)."""
    live = batch * length * (2 * width + 3 * inner + 2 * ff) * e
    return live + batch * heads * length * length * 4


def activation_bytes(model: ModelConfig, component: str, sizes: dict[str, int], precision: str, fused_attention: bool) -> int:
    """Bytes of the widest set of live tensors at `sizes` (each dim at its max)."""
    # INT8/FP8 engines keep activations between GEMMs in the graph's type outside Q/DQ
    e = 4 if precision == "fp32" else outside_qdq_bytes(component) if precision in QUANTIZED else 2
    B = sizes["batch"]
    if component == "text_encoder":
        te = model.text_encoder
        return encoder_activation_bytes(B, te.max_length, te.d_model, te.num_heads * te.d_kv, te.d_ff, te.num_heads, e)
    if component == "denoiser":
        dn = model.denoiser
        T, H, W = sizes["latent_frames"], sizes["latent_height"], sizes["latent_width"]
        S = math.ceil(H / dn.patch_size[1]) * math.ceil(W / dn.patch_size[2])  # STDiT3 pads H, W to even
        N, C, L = T * S, dn.hidden_size, dn.model_max_length
        live = B * N * DENOISER_LIVE_WIDTH * C * e
        text = B * L * (dn.caption_channels + 3 * C) * e  # y input, projected y, cross-attention k/v
        latents = 2 * B * dn.in_channels * T * H * W * 4  # x in, v out (fp32 I/O)
        scores = 0 if fused_attention else B * dn.num_heads * max(T * S * S, S * T * T) * 4
        return live + text + latents + scores
    if component in ("vae_decoder", "vae_encoder"):
        vae = model.vae
        H, W = sizes["latent_height"], sizes["latent_width"]
        frames = sizes.get("frames") or vae.temporal_downsample * sizes["latent_frames"]
        hp, wp = H * vae.spatial_downsample, W * vae.spatial_downsample
        micro = frames  # every frame of the chunk in one call (Open-Sora's 4-frame micro-batch is not in the graph)
        spatial = vae_spatial_peak_bytes(model, B * frames, hp, wp, e)
        temporal_width = vae.temporal.filters * vae.temporal.channel_multipliers[-1]
        temporal = B * frames * H * W * 3 * temporal_width * e
        mid_tokens = H * W  # single-head attention in the mid block at latent resolution
        scores = 0 if fused_attention else B * micro * mid_tokens * mid_tokens * 4
        io = B * frames * (3 * hp * wp + vae.temporal.latent_embed_dim * H * W) * 4
        return spatial + temporal + scores + io
    raise KeyError(component)


# --- shapes ---------------------------------------------------------------------------------------


def _buckets(profile: Profile, model: ModelConfig) -> list[Bucket]:
    for b in profile.buckets:
        if not (model.min_side <= b.height <= model.max_height and model.min_side <= b.width <= model.max_width):
            raise OsxError(f"{profile.name}: bucket {b.name} is outside the sizes {model.name} supports "
                           f"({model.min_side}..{model.max_height} x {model.min_side}..{model.max_width})",
                           hint=f"edit shapes in {profile.source or profile.name}")
        if b.frames > model.max_frames:
            raise OsxError(f"{profile.name}: bucket {b.name} has more frames than {model.name} supports ({model.max_frames})",
                           hint=f"edit shapes in {profile.source or profile.name}")
    return list(profile.buckets)


def _bucket_dims(spec: ComponentSpec, bucket: Bucket, model: ModelConfig, batch: DimRange) -> dict[str, DimRange]:
    """Optimisation-profile dims of one component for one bucket: spatial/temporal dims static."""
    lat = bucket.latent(model)
    dims = {}
    for d, full in spec.dims.items():
        if d == "batch":
            dims[d] = batch
        elif d == "latent_frames" and spec.name == "denoiser":
            dims[d] = DimRange(lat[d], lat[d], lat[d])
        elif d in ("latent_height", "latent_width"):
            dims[d] = DimRange(lat[d], lat[d], lat[d])
        else:  # the VAE's per-chunk frames (1..chunk: the last chunk may be short), the text encoder's batch
            dims[d] = full
    return dims


def _span(profiles: list[dict[str, DimRange]]) -> dict[str, DimRange]:
    """One dynamic range covering every profile; opt is the largest bucket's value."""
    out = {}
    for d in profiles[0]:
        lo = min(p[d].min for p in profiles)
        hi = max(p[d].max for p in profiles)
        out[d] = DimRange(lo, max(p[d].opt for p in profiles), hi)
    return out


def _batch_range(component: str, spec: ComponentSpec, cfg_batching: bool) -> DimRange:
    if component == "denoiser":
        b = 2 if cfg_batching else 1  # min 1: a caller may still run cond and uncond separately
        return DimRange(1, b, b)
    if component in ("vae_decoder", "vae_encoder"):
        return DimRange(1, 1, 1)  # one video at a time: the VAE's activations are the largest
    return spec.dims["batch"]


# --- the planner --------------------------------------------------------------------------------------


def resolve_precisions(profile: Profile, precision: str = "auto") -> dict[str, str]:
    """Per component precision: the profile's policy, or `precision` for the denoiser when given."""
    out = dict(profile.precision)
    if precision != "auto":
        if precision not in PRECISIONS:
            raise OsxError(f"unknown precision {precision!r}", hint=f"use auto or one of {', '.join(PRECISIONS)}")
        out["denoiser"] = precision
    for comp, p in out.items():
        on = profile.with_changes(compute_capability=None) if comp in profile.cpu_components else profile
        check_precision(comp, p, on)
    return out


def machine_ram_bytes() -> int | None:
    """This machine's physical RAM, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def make_plan(profile: Profile, model: ModelConfig, precision: str = "auto") -> Plan:
    """The plan for `model` on `profile`, whether or not it fits (`plan.fits`); osx.profiles.fit.plan_that_fits
    refuses one that does not, with the settings that would."""
    precisions = resolve_precisions(profile, precision)
    family = family_of(model)
    if family.references:  # the VAE encoder (references) runs at the decoder's precision where a profile names none
        for c in family.components:
            if not c.in_pipeline:
                precisions.setdefault(c.name, precisions["vae_decoder"])
    specs = component_specs(model)
    names = [c for c in family.names() if c in precisions]
    buckets = [] if profile.is_cpu else _buckets(profile, model)
    components = {}
    for name in names:
        spec = specs[name]
        on_cpu = profile.is_cpu or name in profile.cpu_components
        if on_cpu and not buckets:  # the CPU profile: the model's full ranges, one dynamic profile
            profiles, bucket_profile = [dict(spec.dims)], {}
        else:
            batch = _batch_range(name, spec, profile.cfg_batching)
            per_bucket = [_bucket_dims(spec, b, model, batch) for b in buckets]
            if profile.dynamic_shapes or on_cpu:
                profiles, bucket_profile = [_span(per_bucket)], {b.name: 0 for b in buckets}
            else:
                profiles, bucket_profile = [], {}
                for b, dims in zip(buckets, per_bucket):
                    if dims not in profiles:
                        profiles.append(dims)
                    bucket_profile[b.name] = profiles.index(dims)
        components[name] = ComponentPlan(
            name=name,
            precision=precisions[name],
            backend="onnxruntime" if on_cpu else "tensorrt",
            device="cpu" if on_cpu else "gpu",
            profiles=profiles,
            bucket_profile=bucket_profile,
            params=component_params(model, name).total,
            weight_bytes=weight_bytes(model, name, precisions[name]),
            activation_bytes=max(activation_bytes(model, name, {d: r.max for d, r in p.items()}, precisions[name],
                                                  fused_attention=not on_cpu) for p in profiles),
            workspace_bytes=0 if on_cpu else int(profile.workspace_gib * GIB),
        )
    plan = Plan(
        profile=profile,
        model=model,
        backend=profile.backend,
        buckets=buckets,
        components=components,
        load_one_at_a_time=profile.load_one_at_a_time,
        cfg_batching=profile.cfg_batching,
        vae_chunk_latent_frames=model.vae.micro_z_frame_size,
        budget_bytes=profile.budget_bytes,
    )
    for name, c in components.items():
        if c.needs_calibration:
            plan.notes.append(f"{name} at {c.precision} needs a calibrated QDQ graph (osx calibrate)")
        if c.device == "cpu" and not profile.is_cpu:
            plan.notes.append(f"{name} runs on the CPU (onnxruntime, {c.precision}): it does not fit beside the GPU work")
    return plan
