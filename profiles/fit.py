"""When a plan does not fit: search for the nearest settings that do, and prove each one by planning it.

Two directions, each returned when it works:
  keep the shapes    -> lower precision (one step at a time), then one denoiser call per CFG half,
                        then the text encoder on the CPU; then every step the fit does not need is undone
  keep the precision -> every bucket replaced by its nearest smaller bucket that fits: fewer frames at
                        the same resolution first, then the next smaller standard resolution
Loading components one at a time is always tried first: it costs nothing but reload time.
"""

from __future__ import annotations

from dataclasses import dataclass

from osx.errors import OsxError
from osx.families import FAMILIES, resolve
from osx.models import ModelConfig
from osx.numeric import format_bytes
from osx.profiles.planner import Plan, make_plan, resolve_precisions
from osx.profiles.profile import BYTES_PER_VALUE, Bucket, Profile, allowed_precisions

# Open-Sora v1.2's resolution buckets (shared notes 1.6), rows of one aspect ratio, largest first.
STANDARD_RESOLUTIONS = (
    ((720, 1280), (480, 854), (360, 640), (240, 426), (144, 256)),  # landscape ("9:16" key = H:W)
    ((1280, 720), (854, 480), (640, 360), (426, 240), (256, 144)),  # portrait
    ((480, 480), (320, 320)),  # square 360p / 240p
)
MIN_FRAMES = 17  # one VAE chunk: below this a video is not worth suggesting


@dataclass
class Suggestion:
    profile: Profile
    precision: str  # pass to make_plan / --precision
    changes: list[str]
    plan: Plan


def _plan(profile: Profile, precision: str, model: ModelConfig) -> Plan:
    return make_plan(profile, model, precision)


def _smaller_resolutions(height: int, width: int) -> list[tuple[int, int]]:
    for row in STANDARD_RESOLUTIONS:
        if (height, width) in row:
            return list(row[row.index((height, width)) + 1:])
    # Not a standard size: step the height down the standard ladder, keeping the aspect ratio.
    return [(h, max(16, round(h * width / height / 2) * 2)) for h in (720, 480, 360, 240, 144) if h < height]


def _fewer_frames(frames: int) -> list[int]:
    """Whole 17-frame VAE chunks below `frames`, largest first."""
    return [f for f in range((frames - 1) // MIN_FRAMES * MIN_FRAMES, MIN_FRAMES - 1, -MIN_FRAMES)]


def _nearest_fitting_bucket(profile: Profile, model: ModelConfig, precision: str, b: Bucket) -> Bucket | None:
    for h, w in [(b.height, b.width)] + _smaller_resolutions(b.height, b.width):
        for f in [b.frames] + _fewer_frames(b.frames):
            candidate = Bucket(h, w, f)
            if _plan(profile.with_changes(buckets=(candidate,)), precision, model).fits:
                return candidate
    return None


def _offload_text_encoder(profile: Profile) -> Profile:
    return profile.with_changes(cpu_components=tuple(sorted({*profile.cpu_components, "text_encoder"})),
                                precision={**profile.precision, "text_encoder": "fp32"})


def _keep_precision(profile: Profile, model: ModelConfig, precision: str, changes: list[str]) -> Suggestion | None:
    changes = list(changes)
    smallest = Bucket(144, 256, MIN_FRAMES)
    if not _plan(profile.with_changes(buckets=(smallest,)), precision, model).fits:
        # Not even the smallest video fits beside the text encoder: move it to the CPU.
        if "text_encoder" in profile.cpu_components:
            return None
        profile = _offload_text_encoder(profile)
        changes.append('cpu_components = ["text_encoder"] (T5 on the CPU, fp32)')
    buckets: list[Bucket] = []
    for b in profile.buckets:
        nb = _nearest_fitting_bucket(profile, model, precision, b)
        if nb is not None and nb not in buckets:
            buckets.append(nb)
    if not buckets:
        return None
    if tuple(buckets) != profile.buckets:
        profile = profile.with_changes(buckets=tuple(buckets))
        changes.append("shapes.buckets = [" + ", ".join(f'"{b.name}"' for b in buckets) + "]")
    plan = _plan(profile, precision, model)
    return Suggestion(profile, precision, changes, plan) if plan.fits else None


def _set_precision(comp: str, value: str):
    def apply(profile: Profile, precision: str):
        if comp == "denoiser":
            return profile, value
        return profile.with_changes(precision={**profile.precision, comp: value}), precision
    return apply


def _lighter_steps(profile: Profile, precision: str) -> list[tuple[str, object]]:
    """(change, apply) in the order tried: each precision one step lower, one denoiser call per CFG half,
    T5 on the CPU. `apply(profile, precision) -> (profile, precision)`."""
    current = resolve_precisions(profile, precision)
    cc = profile.compute_capability
    steps = []
    den = current["denoiser"]
    for level in sorted({BYTES_PER_VALUE[p] for p in allowed_precisions("denoiser", cc)}, reverse=True):
        if level < BYTES_PER_VALUE[den]:
            options = [p for p in allowed_precisions("denoiser", cc) if BYTES_PER_VALUE[p] == level]
            best = next(p for p in ("fp8", "int8", "bf16", "fp16") if p in options)  # fastest first
            steps.append((f"denoiser {best} (--precision {best})", _set_precision("denoiser", best)))
    for comp in ("text_encoder", "vae_decoder", "vae_encoder"):
        if comp in current and comp not in profile.cpu_components and current[comp] == "fp32":
            options = [p for p in ("bf16", "fp16") if p in allowed_precisions(comp, cc)]
            if options:
                steps.append((f'precision.{comp} = "{options[0]}"', _set_precision(comp, options[0])))
    if profile.cfg_batching:
        steps.append(("shapes.cfg_batching = false (cond and uncond in two denoiser calls)",
                      lambda p, prec: (p.with_changes(cfg_batching=False), prec)))
    if "text_encoder" not in profile.cpu_components:
        steps.append(('cpu_components = ["text_encoder"] (T5 on the CPU, fp32)', lambda p, prec: (_offload_text_encoder(p), prec)))
    return steps


def _apply(profile: Profile, precision: str, steps) -> tuple[Profile, str]:
    for _, apply in steps:
        profile, precision = apply(profile, precision)
    return profile, precision


def _keep_shapes(profile: Profile, model: ModelConfig, precision: str, changes: list[str]) -> Suggestion | None:
    steps = _lighter_steps(profile, precision)
    for n in range(1, len(steps) + 1):
        if _plan(*_apply(profile, precision, steps[:n]), model).fits:
            break
    else:
        return None
    used = steps[:n]
    for step in list(used[:-1]):  # drop every earlier step the fit does not need
        trial = [s for s in used if s is not step]
        if _plan(*_apply(profile, precision, trial), model).fits:
            used = trial
    new_profile, new_precision = _apply(profile, precision, used)
    return Suggestion(new_profile, new_precision, changes + [c for c, _ in used], _plan(new_profile, new_precision, model))


def suggest_fits(profile: Profile, model: ModelConfig, precision: str = "auto") -> list[Suggestion]:
    """Settings near `profile` that fit its card, each verified with make_plan. Empty if none does."""
    changes: list[str] = []
    if not profile.load_one_at_a_time:
        profile = profile.with_changes(load_one_at_a_time=True)
        changes.append("load_one_at_a_time = true")
        plan = _plan(profile, precision, model)
        if plan.fits:
            return [Suggestion(profile, precision, changes, plan)]
    out = []
    for s in (_keep_shapes(profile, model, precision, changes), _keep_precision(profile, model, precision, changes)):
        if s is not None and all(s.changes != o.changes for o in out):
            out.append(s)
    return out


def _planner(model):
    """The model's family's planner and fit search (its declaration names them), else this package's."""
    family = FAMILIES.get(getattr(model, "family", None))
    if family is None or family.planner is None:
        return make_plan, suggest_fits
    plan, suggest = (resolve(path) for path in family.planner)
    return plan, lambda *args, **options: [s if isinstance(s, Suggestion) else Suggestion(*s) for s in suggest(*args, **options)]


def plan_that_fits(profile: Profile, model: ModelConfig, precision: str = "auto", host_ram_bytes: int | None = None,
                   **options) -> Plan:
    """make_plan, refused with the numbers and the nearest settings that fit when the plan does not fit.
    `host_ram_bytes`: the RAM of the machine that will run it, when known; the CPU components must fit it.
    `options`: the family planner's (Open-Sora v2.0: with_t2i)."""
    plan = _planner(model)[0](profile, model, precision, **options)
    plan.host_ram_bytes = host_ram_bytes
    if not plan.host_fits:
        cpu = ", ".join(f"{c.name} at {c.precision}" for c in plan.components.values() if c.device == "cpu")
        raise OsxError(f"{model.name} on {profile.name} needs {format_bytes(plan.host_peak_bytes, 2)} of host RAM for the "
                       f"components it runs on the CPU ({cpu}); this machine has {format_bytes(host_ram_bytes, 2)}",
                       hint="a calibrated int8 text encoder needs about a quarter of that: set text_encoder = \"int8\" in a copy "
                       "of the profile TOML and pass --gpu that.toml (with --calibration from osx calibrate); or add RAM")
    if not plan.fits:
        raise OsxError(_refusal(plan, precision), hint=_suggestion_hint(plan, precision))
    return plan


def _refusal(plan: Plan, precision: str) -> str:
    p = plan.profile
    worst = max((c for c in plan.components.values() if c.device == "gpu"), key=lambda c: c.build_bytes)
    return (f"{plan.model.name} does not fit {p.name} ({p.display_name}): peak {format_bytes(plan.run_peak_bytes, 2)} to run, "
            f"{format_bytes(plan.build_peak_bytes, 2)} to build, budget {format_bytes(plan.budget_bytes, 2)} "
            f"({p.vram_gib:g} GiB less {p.reserve_gib:g} GiB reserved); largest: {worst.name} at {worst.precision} = "
            f"{format_bytes(worst.weight_bytes, 2)} weights + {format_bytes(worst.activation_bytes, 2)} activations + "
            f"{format_bytes(worst.workspace_bytes, 2)} workspace")


def _suggestion_hint(plan: Plan, precision: str) -> str:
    suggestions = _planner(plan.model)[1](plan.profile, plan.model, precision, **plan.options)
    if not suggestions:
        return "no smaller setting fits this card; use a GPU with more memory or --gpu cpu"
    lines = ["nearest settings that fit:"]
    for s in suggestions:
        lines.append(f"  - {'; '.join(s.changes)} (peak {format_bytes(s.plan.run_peak_bytes, 2)} run / "
                     f"{format_bytes(s.plan.build_peak_bytes, 2)} build)")
    lines.append("    write them into a copy of the profile TOML and pass --gpu that.toml" +
                 (", or pass the --precision shown" if any(s.precision != precision for s in suggestions) else ""))
    return "\n".join(lines)
