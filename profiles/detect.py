"""`--gpu auto`: read the installed GPU (osx.gpu), pick the nearest profile."""

from __future__ import annotations

import re

from osx.errors import OsxError
from osx.gpu import GpuInfo, detect_gpus
from osx.profiles.profile import GIB, Profile, load_profile, shipped_profiles


def nearest_profile(gpu: GpuInfo, profiles: list[Profile]) -> tuple[Profile, str]:
    """The profile for `gpu`: one whose `match` regex names it, else the largest shipped card that this one
    covers (same or higher compute capability, at least as much memory), nearest compute capability first."""
    lowered = gpu.name.lower()
    memory_gib = gpu.memory_bytes / GIB
    gpu_profiles = [p for p in profiles if not p.is_cpu]
    # A name can cover variants with different memory (RTX 4060 Ti 8 GB / 16 GB): the largest that fits.
    named = [p for p in gpu_profiles if any(re.search(m, lowered) for m in p.match) and p.vram_gib <= memory_gib + 0.25]
    if named:
        p = max(named, key=lambda p: p.vram_gib)
        return p, f"detected {gpu.name} (compute capability {gpu.cc_text}, {memory_gib:.1f} GiB): using profile {p.name}"
    covered = [p for p in gpu_profiles if p.compute_capability <= gpu.compute_capability and p.vram_gib <= memory_gib + 0.25]
    if not covered:
        raise OsxError(f"no shipped profile fits {gpu.name} (compute capability {gpu.cc_text}, {memory_gib:.1f} GiB)",
                       hint="write your own profile TOML (copy profiles/rtx4060.toml) and pass --gpu path/to/it.toml")
    best = max(covered, key=lambda p: (p.compute_capability[0] == gpu.compute_capability[0], p.vram_gib, p.compute_capability))
    return best, (f"detected {gpu.name} (compute capability {gpu.cc_text}, {memory_gib:.1f} GiB): no profile names it; "
                  f"using {best.name} ({best.display_name}, {best.cc_text}, {best.vram_gib:g} GiB), the nearest it covers")


def detect_profile() -> tuple[Profile, str]:
    """For `--gpu auto`: the profile of GPU 0 and a sentence saying which and why."""
    gpus, problems = detect_gpus()
    if not gpus:
        raise OsxError("--gpu auto found no NVIDIA GPU (" + "; ".join(problems) + ")",
                       hint=f"pass --gpu NAME (one of {', '.join(shipped_profiles())}) or --gpu cpu")
    profile, why = nearest_profile(gpus[0], [load_profile(n) for n in shipped_profiles()])
    if len(gpus) > 1:
        why += f" (GPU 0 of {len(gpus)})"
    return profile, why
