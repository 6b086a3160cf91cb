"""Plans for Open-Sora v2.0 (T5-XXL, CLIP, MMDiT, HunyuanVideo VAE): profiles/planner.py's memory model with
this family's shapes, and TensorRT weight streaming where the denoiser's weights do not fit the card.

A profile's [family."opensora-v2.0"] table gives the settings (precisions, buckets "HxWxF", F = 4k+1,
weight_streaming); the card's facts (VRAM, reserve, PCIe bandwidth) are the profile's own.

Activations per component (bytes, at the bucket's size; 2 bytes a value, 4 at fp32):
  text_encoder  T5-XXL at 512 tokens, batch 2 (prompt, negative): planner.encoder_activation_bytes
  clip          CLIP's text tower at 77 tokens, batch 2: the same rule
  denoiser      R rows (the 3 guidance passes in one call with cfg_batching, else 1) x N = N_img + 512 tokens x
                MMDIT_LIVE_WIDTH x hidden, plus its float32 inputs/outputs and RoPE tables
  vae_decoder   one spatial tile (Open-Sora's 32x32 latent tiles) with every frame (temporal tiling is off):
                the widest point, VAE_LIVE_MAPS maps of the width entering the last up block + one of its own
                width at full resolution; the mid-block's frame-causal mask, dense bool [L, L]
  vae_encoder   an i2v/v2v reference (up to 33 frames) per 256 px tile, the same rule at the first level
  t2i_denoiser  (with_t2i) Flux.1-dev on t2i2v's first frame: the denoiser's rule, one row, one latent frame,
                the image of the training bucket closest to the video's aspect ratio at 768px
  t2i_decoder   (with_t2i) Flux's AE decoder on that image, not tiled: the VAE rule at one frame, plus the
                mid-block's one-head attention scores over the (H/8)(W/8) latent pixels

t2i2v (`with_t2i`, `osx export --with-t2i`): both 12B transformers are planned; with load_one_at_a_time they
are on the card one after the other. Their precisions: the table's `t2i_denoiser` / `t2i_decoder` entries,
else the denoiser's / the VAE decoder's.

Weight streaming (`weight_streaming = true`; engines built with TensorRT's WEIGHT_STREAMING flag): when a
transformer (the denoiser, Flux) does not fit, resident = budget - activations - workspace - scratch bytes of its weights stay on the
card (the runtime's weight_streaming_budget_v2) and the rest is copied from pinned host memory at every call:
streamed / pcie_gbps seconds per call, an upper bound (TensorRT overlaps the copies with compute). Scratch:
two of the largest layer (the one computing, the next arriving). The build is counted at the run's device
memory (the builder times layer by layer; TensorRT states no builder-side budget: unverified on a GPU here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from osx.components import DimRange
from osx.errors import InputError, OsxError
from osx.families import component_specs
from osx.families.opensora_v2_0 import t2i_component_specs
from osx.models_v2 import (
    T2I_CONFIGS, MMDiTConfig, OpenSoraV2Config, T2IConfig, aspect_buckets, check_frames, image_size, latent_frames_v2,
    latent_shape,
)
from osx.numeric import GIB, format_bytes
from osx.profiles.params_v2 import component_params_v2
from osx.profiles.planner import (
    VAE_LIVE_MAPS, ComponentPlan, Plan, _span, encoder_activation_bytes, params_bytes, resolve_precisions,
)
from osx.profiles.profile import BYTES_PER_VALUE, Bucket, Profile, check_precision
from osx.vae_tiling import tile_starts

COMPONENTS_V2 = ("text_encoder", "clip", "denoiser", "vae_decoder", "vae_encoder")  # vae_encoder: i2v / v2v
T2I_COMPONENTS = ("t2i_denoiser", "t2i_decoder")  # t2i2v's image step (Flux.1-dev and its AE decoder)
TRANSFORMERS = ("denoiser", "t2i_denoiser")  # what weight streaming applies to
# Live activations per token of the MMDiT, in units of hidden_size: a single-stream block holds the residual,
# the modulated input, q and k (2), v + the MLP input (5), the attention output and GELU(MLP input) (4),
# its output (1): 15, rounded up for the modulation vectors and TensorRT's reformatting copies.
MMDIT_LIVE_WIDTH = 16
REFERENCE_FRAMES = 33  # the longest reference encoded: v2v's first/last 33 frames (an i2v image is 1)
GUIDANCE_PASSES = 3  # (prompt, reference), (negative, reference), (negative, none); t2v runs 2
STREAM_SCRATCH_LAYERS = 2


@dataclass
class Streaming:
    """How the denoiser's weights are split between the card and the host, and what that costs per step."""

    device_bytes: int  # weights kept on the card (weight_streaming_budget_v2)
    streamed_bytes: int  # weights copied in at every call
    scratch_bytes: int
    calls_per_step: int
    pcie_gbps: float | None

    @property
    def seconds_per_call(self) -> float | None:
        return None if self.pcie_gbps is None else self.streamed_bytes / (self.pcie_gbps * 1e9)

    def to_dict(self, steps: int) -> dict:
        s = self.seconds_per_call
        return {"weight_streaming_budget": self.device_bytes, "streamed_per_call": self.streamed_bytes,
                "scratch": self.scratch_bytes, "calls_per_step": self.calls_per_step, "pcie_gbps": self.pcie_gbps,
                "seconds_per_step": None if s is None else s * self.calls_per_step,
                "seconds_per_run": None if s is None else s * self.calls_per_step * steps}


@dataclass
class PlanV2(Plan):
    streaming: dict[str, Streaming] = field(default_factory=dict)

    def latent(self, bucket: Bucket) -> dict[str, int]:
        return latent_dims(self.model, bucket)

    def vae_frames_per_call(self) -> int:
        return (self.vae_chunk_latent_frames - 1) * self.model.temporal_downsample + 1

    def steps(self, component: str) -> int:
        return T2I_CONFIGS[self.model.name].num_steps if component == "t2i_denoiser" else self.model.sampler.num_steps

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["weight_streaming"] = {n: s.to_dict(self.steps(n)) for n, s in self.streaming.items()}
        return d


def latent_dims(cfg: OpenSoraV2Config, b: Bucket) -> dict[str, int]:
    _, T, h, w = latent_shape(cfg, b.height, b.width, b.frames)
    return {"latent_frames": T, "latent_height": h, "latent_width": w}


def _check_bucket(cfg: OpenSoraV2Config, profile: Profile, b: Bucket) -> Bucket:
    largest = max(cfg.resolutions.values()) ** 2
    where = profile.source or f'{profile.name} [family."{cfg.family}"]'  # a family table's source names the table
    if b.height % 16 or b.width % 16 or b.height * b.width > largest:
        name = min(cfg.resolutions, key=cfg.resolutions.get)
        h, w = image_size(cfg, name, cfg.defaults.aspect_ratio)
        raise OsxError(f"{profile.name}: bucket {b.name}: {cfg.name} takes sides in multiples of 16 and at most "
                       f"{largest} pixels", hint=f"e.g. {h}x{w}x{cfg.defaults.num_frames} ({name} {cfg.defaults.aspect_ratio}); "
                       f"edit {where}")
    try:
        check_frames(cfg, b.frames)
    except InputError as e:
        raise OsxError(f"{profile.name}: bucket {b.name}: {e.message}", hint=f"edit {where}") from None
    return b


def _vae_tile(cfg: OpenSoraV2Config, h: int, w: int) -> tuple[int, int]:
    """Latent size of the largest tile Open-Sora's spatial tiling decodes (the whole latent when it fits one)."""
    return tuple(max(sizes) for sizes in _vae_tile_sizes(cfg, h, w))


def _vae_tile_sizes(cfg: OpenSoraV2Config, h: int, w: int) -> tuple[list[int], list[int]]:
    """Latent sizes of the tiles along each axis, as osx.vae_tiling cuts them: square tiles of tile_latent_size every
    3/4 of one, the last of a row or column shorter (256px 16:9, latent 24 x 42: widths 32 and 18); the encoder's
    pixel tiles are the same at 8x. The whole latent when it fits one tile."""
    t = cfg.vae.tile_latent_size
    if not (cfg.vae.use_spatial_tiling and (h > t or w > t)):
        return [h], [w]
    stride = int(t * (1 - cfg.vae.tile_overlap_factor))
    return tuple([min(t, n - s) for s in tile_starts(n, stride)] for n in (h, w))


def activation_bytes_v2(cfg: OpenSoraV2Config, component: str, sizes: dict[str, int], precision: str,
                        fused_attention: bool = True) -> int:
    e = 4 if precision == "fp32" else 2
    B = sizes["batch"]
    if component == "text_encoder":
        t5 = cfg.t5
        return encoder_activation_bytes(B, t5.max_length, t5.d_model, t5.num_heads * t5.d_kv, t5.d_ff, t5.num_heads, e)
    if component == "clip":
        c = cfg.clip
        return encoder_activation_bytes(B, c.max_length, c.hidden_size, c.hidden_size, c.intermediate_size,
                                        c.num_attention_heads, e)
    if component in TRANSFORMERS:  # their graphs take packed tokens (osx.families.opensora_v2_0)
        m = cfg.mmdit if component == "denoiser" else T2I_CONFIGS[cfg.name].mmdit
        return mmdit_activation_bytes(m, B, sizes["tokens"], cfg.t5.max_length, e, fused_attention)
    if component == "t2i_decoder":
        return flux_decoder_activation_bytes(T2I_CONFIGS[cfg.name], B, sizes["latent_height"], sizes["latent_width"], e)
    vae, s = cfg.vae, cfg.spatial_downsample
    h, w = sizes["latent_height"], sizes["latent_width"]
    if component == "vae_encoder":  # its input is pixel frames
        frames = sizes["frames"]
        T = latent_frames_v2(frames, vae.time_compression_ratio)
    else:
        T = sizes["latent_frames"]
        frames = (T - 1) * vae.time_compression_ratio + 1
    th, tw = _vae_tile(cfg, h, w)
    boc = vae.block_out_channels
    maps = VAE_LIVE_MAPS * (boc[1] if component == "vae_decoder" else boc[0]) + boc[0]
    widest = frames * (th * s) * (tw * s) * maps * e
    mask = (T * th * tw) ** 2  # the mid block's dense frame-causal mask (bool), export/hunyuan_vae.py
    io = frames * 3 * (th * s) * (tw * s) * 4 + 2 * vae.latent_channels * T * th * tw * 4
    return widest + mask + io


def mmdit_activation_bytes(m: MMDiTConfig, B: int, n_img: int, L: int, e: int, fused_attention: bool) -> int:
    """B rows of n_img image + L text tokens: MMDIT_LIVE_WIDTH hidden widths per token, float32 I/O (img,
    velocity, cond when it has one, text, pooled, timestep, guidance when it has one), float32 RoPE tables."""
    N = n_img + L
    live = B * N * MMDIT_LIVE_WIDTH * m.hidden_size * e
    per_token = 2 * m.in_channels + (m.cond_channels if m.cond_embed else 0)
    io = B * (n_img * per_token + L * m.context_in_dim + m.vec_in_dim + 1 + int(m.guidance_embed)) * 4
    rope = 2 * N * m.head_dim * 4
    scores = 0 if fused_attention else B * m.num_heads * N * N * 4
    return live + io + rope + scores


def flux_decoder_activation_bytes(t2i: T2IConfig, B: int, h: int, w: int, e: int) -> int:
    """The Flux AE decoder on a latent h x w: at 8h x 8w, VAE_LIVE_MAPS maps of the width entering the last
    level + one of its own; the mid block's scores [hw, hw]; float32 pixels out and latent in."""
    a, s = t2i.ae, 2 ** (len(t2i.ae.ch_mult) - 1)
    widest = B * (h * s) * (w * s) * (VAE_LIVE_MAPS * a.ch * a.ch_mult[1] + a.ch * a.ch_mult[0]) * e
    return widest + B * (h * w) ** 2 * e + B * (3 * (h * s) * (w * s) + a.z_channels * h * w) * 4


def t2i_image(cfg: OpenSoraV2Config, height: int, width: int) -> tuple[int, int]:
    """The t2i2v image of a video height x width: the training bucket at the image resolution whose
    aspect ratio is closest to the video's (Open-Sora picks it by the ratio's name)."""
    side = int(T2I_CONFIGS[cfg.name].image_resolution[:-2])
    return min(aspect_buckets(side, training=True).values(), key=lambda hw: abs(hw[0] / hw[1] - height / width))


def t2i_latent_dims(cfg: OpenSoraV2Config, height: int, width: int, frames: int = 1) -> dict[str, int]:
    """The image latent of a video's t2i2v first frame (`frames` is the video's: one image whatever it is)."""
    h, w = t2i_image(cfg, height, width)
    return latent_dims(cfg, Bucket(h, w, 1))


def weight_bytes_v2(cfg: OpenSoraV2Config, component: str, precision: str) -> int:
    return params_bytes(component_params_v2(cfg, component), component, precision)


def _full_dims(cfg: OpenSoraV2Config, component: str, cfg_batching: bool) -> dict[str, DimRange]:
    """The model's whole range (the CPU plan): the family's component spec, every bucket, 1 to max frames;
    t2i2v's: every training bucket of the image."""
    specs = t2i_component_specs(cfg) if component in T2I_COMPONENTS else component_specs(cfg)
    dims = dict(specs[component].dims)
    if not cfg_batching and component == "denoiser":
        dims["batch"] = DimRange(1, 1, 1)
    return dims


def _default_bucket(cfg: OpenSoraV2Config) -> Bucket:
    return Bucket(*image_size(cfg, cfg.defaults.resolution, cfg.defaults.aspect_ratio), cfg.defaults.num_frames)


def _dims(cfg, component: str, lat: dict[str, int], cfg_batching: bool, low: int | None = None) -> dict[str, DimRange]:
    """Optimisation-profile dims of one component; spatial/temporal dims static per bucket (low=None)."""
    def fixed(n):
        return DimRange(n, n, n) if low is None else DimRange(low, n, n)

    if component in ("text_encoder", "clip"):
        return {"batch": DimRange(1, 2, 2)}
    if component in TRANSFORMERS:  # packed image tokens (the family's denoiser spec)
        rows = GUIDANCE_PASSES if cfg_batching and component == "denoiser" else 1
        p = cfg.mmdit.patch_size
        return {"batch": DimRange(1, rows, rows),
                "tokens": fixed(lat["latent_frames"] * (lat["latent_height"] // p) * (lat["latent_width"] // p))}
    if component == "t2i_decoder":  # one image, not tiled
        return {"batch": DimRange(1, 1, 1), "latent_height": fixed(lat["latent_height"]), "latent_width": fixed(lat["latent_width"])}
    # every tile size the host cuts (osx.vae_tiling), so a short last tile runs on the bucket's engine profile
    hs, ws = _vae_tile_sizes(cfg, lat["latent_height"], lat["latent_width"])
    tile = {"latent_height": DimRange(min(hs) if low is None else low, max(hs), max(hs)),
            "latent_width": DimRange(min(ws) if low is None else low, max(ws), max(ws))}
    if component == "vae_encoder":  # pixel frames of the reference
        F = min((lat["latent_frames"] - 1) * cfg.temporal_downsample + 1, REFERENCE_FRAMES)
        return {"batch": DimRange(1, 1, 1), "frames": DimRange(1, F, F), **tile}
    T = lat["latent_frames"]
    return {"batch": DimRange(1, 1, 1), "latent_frames": DimRange(1, T, T), **tile}


def _streaming(cfg: OpenSoraV2Config, fam: Profile, c: ComponentPlan) -> Streaming | None:
    """Weights kept on the card when a transformer does not fit whole (None: it fits, or streaming is off)."""
    if not (fam.weight_streaming and c.name in TRANSFORMERS and c.device == "gpu" and c.run_bytes > fam.budget_bytes):
        return None
    m = cfg.mmdit if c.name == "denoiser" else T2I_CONFIGS[cfg.name].mmdit
    largest = m.hidden_size * max(6 * m.hidden_size, m.hidden_size + m.mlp_hidden_dim)  # the modulation Linear
    scratch = STREAM_SCRATCH_LAYERS * largest * BYTES_PER_VALUE[c.precision]
    device = max(0, fam.budget_bytes - c.activation_bytes - c.workspace_bytes - scratch)
    calls = 1 if fam.cfg_batching or c.name == "t2i_denoiser" else GUIDANCE_PASSES  # Flux: one distilled pass
    return Streaming(min(device, c.weight_bytes), c.weight_bytes - min(device, c.weight_bytes), scratch, calls, fam.pcie_gbps)


def make_plan_v2(profile: Profile, cfg: OpenSoraV2Config, precision: str = "auto", with_t2i: bool = False) -> PlanV2:
    """The plan for an Open-Sora v2.0 model on `profile` (its [family."opensora-v2.0"] settings), fitting or not;
    `with_t2i`: also t2i2v's Flux.1-dev and its AE decoder."""
    fam = profile.for_family(cfg.family)
    if fam is None:
        raise OsxError(f"{profile.name} has no settings for {cfg.family}",
                       hint=f'add a [family."{cfg.family}"] table to {profile.source or profile.name} (see profiles/rtx4090.toml)')
    precisions = resolve_precisions(fam, precision)
    if with_t2i:
        precisions = _with_t2i_precisions(fam, precisions)
    else:
        precisions = {n: p for n, p in precisions.items() if n not in T2I_COMPONENTS}
    buckets = [] if fam.is_cpu else [_check_bucket(cfg, fam, b) for b in fam.buckets]
    components, streaming = {}, {}
    for name in (c for c in COMPONENTS_V2 + T2I_COMPONENTS if c in precisions):
        on_cpu = fam.is_cpu or name in fam.cpu_components
        lat = t2i_latent_dims if name in T2I_COMPONENTS else lambda cfg, h, w, f: latent_dims(cfg, Bucket(h, w, f))
        if not buckets:
            d = _default_bucket(cfg)
            profiles, bucket_profile = [_full_dims(cfg, name, fam.cfg_batching)], {}
            sized = [_dims(cfg, name, lat(cfg, d.height, d.width, d.frames), fam.cfg_batching)]
        else:
            per_bucket = [_dims(cfg, name, lat(cfg, b.height, b.width, b.frames), fam.cfg_batching) for b in buckets]
            if fam.dynamic_shapes or on_cpu:
                profiles, bucket_profile = [_span(per_bucket)], {b.name: 0 for b in buckets}
            else:
                profiles = [d for i, d in enumerate(per_bucket) if d not in per_bucket[:i]]
                bucket_profile = {b.name: profiles.index(d) for b, d in zip(buckets, per_bucket)}
            sized = profiles
        acts = max(activation_bytes_v2(cfg, name, {d: r.max for d, r in p.items()}, precisions[name], not on_cpu)
                   for p in sized)
        c = ComponentPlan(
            name=name, precision=precisions[name], backend="onnxruntime" if on_cpu else "tensorrt",
            device="cpu" if on_cpu else "gpu", profiles=profiles, bucket_profile=bucket_profile,
            params=component_params_v2(cfg, name).total, weight_bytes=weight_bytes_v2(cfg, name, precisions[name]),
            activation_bytes=acts, workspace_bytes=0 if on_cpu else int(fam.workspace_gib * GIB))
        if (s := _streaming(cfg, fam, c)) is not None:
            c.activation_bytes += s.scratch_bytes
            c.streamed_bytes = s.streamed_bytes
            streaming[name] = s
        components[name] = c
    plan = PlanV2(profile=fam, model=cfg, backend=fam.backend, buckets=buckets, components=components,
                  load_one_at_a_time=fam.load_one_at_a_time, cfg_batching=fam.cfg_batching,
                  vae_chunk_latent_frames=max(latent_dims(cfg, b)["latent_frames"] for b in buckets or [_default_bucket(cfg)]),
                  budget_bytes=fam.budget_bytes, streaming=streaming, options={"with_t2i": True} if with_t2i else {})
    _notes(plan)
    return plan


def _with_t2i_precisions(fam: Profile, precisions: dict[str, str]) -> dict[str, str]:
    """The table's t2i entries, else Flux at the denoiser's precision and its decoder at the VAE decoder's."""
    out = {**precisions, "t2i_denoiser": precisions.get("t2i_denoiser", precisions["denoiser"]),
           "t2i_decoder": precisions.get("t2i_decoder", precisions["vae_decoder"])}
    for comp in T2I_COMPONENTS:
        check_precision(comp, out[comp], fam.with_changes(compute_capability=None) if comp in fam.cpu_components else fam)
    return out


def _notes(plan: PlanV2) -> None:
    for name, c in plan.components.items():
        if c.needs_calibration:
            plan.notes.append(f"{name} at {c.precision} needs a calibrated QDQ graph (osx calibrate)")
        if c.device == "cpu" and not plan.profile.is_cpu:
            plan.notes.append(f"{name} runs on the CPU (onnxruntime, {c.precision})")
    if not plan.buckets:
        plan.notes.append(f"activations counted at the default video ({_default_bucket(plan.model).name}); "
                          "larger ones need more")
    if "t2i_denoiser" in plan.components:
        plan.notes.append("t2i2v: Flux.1-dev (t2i_denoiser) makes the first frame, then the denoiser animates it: "
                          + ("one transformer loaded at a time" if plan.load_one_at_a_time else "both loaded together"))
    for name, s in plan.streaming.items():
        c, steps = plan.components[name], plan.steps(name)
        head = (f"{name}: TensorRT weight streaming: {format_bytes(s.device_bytes, 2)} of {format_bytes(c.weight_bytes, 2)} "
                f"weights on the card (weight_streaming_budget_v2), {format_bytes(s.streamed_bytes, 2)} copied from host "
                f"memory at each of {s.calls_per_step} call(s) per step")
        host = f"; host RAM holds all {format_bytes(c.weight_bytes, 2)} (TensorRT keeps a streamable engine's weights there)"
        if s.seconds_per_call is None:
            plan.notes.append(head + "; the slowdown is unknown: set pcie_gbps in the profile" + host)
        else:
            per_step = s.seconds_per_call * s.calls_per_step
            plan.notes.append(head + f": +{per_step:.2f} s per step at {s.pcie_gbps:g} GB/s (+{per_step * steps:.0f} s over "
                              f"{steps} steps; an upper bound, TensorRT overlaps copies with compute)" + host)
    if plan.profile.weight_streaming and not plan.streaming:
        plan.notes.append("weight streaming allowed but not needed: the transformers fit whole")


def suggest_fits_v2(profile: Profile, cfg: OpenSoraV2Config, precision: str = "auto",
                    with_t2i: bool = False) -> list[tuple[Profile, str, list[str], PlanV2]]:
    """(family settings, precision, changes, plan) near `profile` that fit: weight streaming, then fewer
    frames per bucket (4k+1, same size). Each is verified by planning it."""
    fam = profile.for_family(cfg.family)
    if fam is None or fam.is_cpu:
        return []
    key, changes = f'family."{cfg.family}"', []
    if not fam.weight_streaming:
        fam = fam.with_changes(weight_streaming=True)
        changes.append(f"{key}.weight_streaming = true")
        plan = make_plan_v2(_with_family(profile, cfg, fam), cfg, precision, with_t2i)
        if plan.fits:
            return [(fam, precision, changes, plan)]
    buckets = []
    for b in fam.buckets:
        for f in range(b.frames, 0, -cfg.temporal_downsample):  # every 4k+1 below
            trial = fam.with_changes(buckets=(Bucket(b.height, b.width, f),))
            if make_plan_v2(_with_family(profile, cfg, trial), cfg, precision, with_t2i).fits:
                buckets.append(Bucket(b.height, b.width, f))
                break
    if not buckets:
        return []
    fam = fam.with_changes(buckets=tuple(dict.fromkeys(buckets)))
    changes.append(f"{key}.shapes.buckets = [" + ", ".join(f'"{b.name}"' for b in fam.buckets) + "]")
    plan = make_plan_v2(_with_family(profile, cfg, fam), cfg, precision, with_t2i)
    return [(fam, precision, changes, plan)] if plan.fits else []


def _with_family(profile: Profile, cfg: OpenSoraV2Config, fam: Profile) -> Profile:
    return profile.with_changes(families={**profile.families, cfg.family: fam})
