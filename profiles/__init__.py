"""GPU profiles and the planner (no GPU, no torch needed).

    load_profile("rtx4070")                  -> Profile (or a path to your own TOML)
    detect_profile()                         -> (Profile, explanation)       for --gpu auto
    plan_that_fits(profile, model, "auto")   -> Plan (raises OsxError with settings that fit if it does not)
    make_plan(profile, model, "auto")        -> Plan, fitting or not (`plan.fits`)
    render_plan(plan) / plan.to_json()       -> the table / JSON of `osx export --dry-run [--json]`
    dry_run("rtx4070", "opensora-v1.2")      -> the text `--dry-run` prints
"""

from osx.profiles.detect import GpuInfo, detect_gpus, detect_profile, nearest_profile
from osx.profiles.fit import Suggestion, plan_that_fits, suggest_fits
from osx.profiles.planner import ComponentPlan, Plan, make_plan, resolve_precisions
from osx.profiles.profile import (
    PRECISIONS, Bucket, Profile, allowed_precisions, check_precision, load_profile, profile_from_dict, shipped_profiles,
)
from osx.profiles.render import dry_run, render_plan

__all__ = [
    "Bucket", "ComponentPlan", "GpuInfo", "PRECISIONS", "Plan", "Profile", "Suggestion", "allowed_precisions",
    "check_precision", "detect_gpus", "detect_profile", "dry_run", "load_profile", "make_plan", "nearest_profile",
    "plan_that_fits", "profile_from_dict", "render_plan", "resolve_precisions", "shipped_profiles", "suggest_fits",
]
