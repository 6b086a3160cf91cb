"""Model-family declarations: every stage reads them, and the generic code names no family."""

import json
import re
from pathlib import Path

import pytest

from osx.errors import OsxError
from osx.families import (
    FAMILIES, MODELS, component_specs, config_from_manifest, family_of, get_family, get_model_config, never_fp16, quantizable,
)
from osx.profiles import load_profile, make_plan
from osx.profiles.profile import check_precision

ROOT = Path(__file__).resolve().parents[1]
# Generic code: the CLI, the manifest and bundle tools, the planner. None of it may name a family or model.
GENERIC = ["osx/cli.py", "osx/manifest.py", "osx/bundle.py", "osx/archive.py", "osx/engine_key.py",
           "profiles/planner.py", "profiles/fit.py", "profiles/render.py", "runtime/pipeline.py",
           "calibration/capture.py", "calibration/apply.py", "calibration/gate.py", *map(str, (ROOT / "osx/commands").glob("*.py"))]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_declared_model_round_trips_through_the_manifest(name):
    cfg = get_model_config(name)
    family = family_of(cfg)
    assert name in family.configs and family.name in FAMILIES
    model = json.loads(json.dumps({"name": cfg.name, "family": cfg.family, "config": cfg.to_dict()}))
    assert config_from_manifest(model) == cfg
    specs = component_specs(cfg)
    assert tuple(specs) == family.names()  # one spec per declared component, in export order
    for c in family.components:
        assert c.weights in {w.part for w in family.weights}, f"{c.name}'s weights come from no declared part"


def test_the_declaration_drives_the_dtype_policy_and_the_plan():
    family = get_family("opensora-v1.2")
    assert family.reference_dtype == "bf16" and family.sampler.guidance_passes == 2
    assert never_fp16("text_encoder") == family.never_fp16["text_encoder"] and never_fp16("vae_decoder") is None
    assert quantizable("denoiser") and not quantizable("vae_decoder")
    with pytest.raises(OsxError, match=re.escape(family.never_fp16["text_encoder"])):
        check_precision("text_encoder", "fp16", load_profile("rtx4090"))
    plan = make_plan(load_profile("cpu"), get_model_config("opensora-v1.2-tiny"))
    assert family.references and tuple(plan.components) == family.names()  # the VAE encoder too: v1.2 takes references


def test_the_vae_encoder_is_planned_as_the_decoder_and_runs_alone():
    """The VAE encoder (references) gets the decoder's precision where a profile names none, its own shapes and
    memory, and counts on its own in the run peak: the runtime releases everything else before it runs."""
    family = get_family("opensora-v1.2")
    for name, model in (("rtx4070", "opensora-v1.2"), ("h100", "opensora-v1.2"), ("cpu", "opensora-v1.2-tiny")):
        plan = make_plan(load_profile(name), get_model_config(model))
        enc, dec = plan.components["vae_encoder"], plan.components["vae_decoder"]
        assert (enc.precision, enc.backend, enc.device) == (dec.precision, dec.backend, dec.device)
        assert enc.weight_bytes > 0 and enc.activation_bytes > 0 and enc.profiles
        rest = [c.run_bytes for n, c in plan.components.items() if n != "vae_encoder" and c.device == "gpu"]
        together = max(rest, default=0) if plan.load_one_at_a_time else sum(rest)
        assert plan.run_peak_bytes == max(together, enc.run_bytes if enc.device == "gpu" else 0)
    assert [c.name for c in family.components if not c.in_pipeline] == ["vae_encoder"]


def test_unknown_names_are_refused():
    with pytest.raises(OsxError, match="unknown model 'opensora-v9'") as e:
        get_model_config("opensora-v9")
    assert "opensora-v1.2-tiny" in e.value.hint
    with pytest.raises(OsxError, match="unknown model family"):
        get_family("opensora-v9")


@pytest.mark.parametrize("path", GENERIC)
def test_generic_code_names_no_family(path):
    names = sorted({*FAMILIES, *MODELS}, key=len, reverse=True)
    text = (ROOT / path).read_text()
    found = [n for n in names if n in text]
    assert not found, f"{path} names {found}: read it from the family declaration (osx.families) instead"
