"""The model families osx knows, and the lookups every stage uses instead of naming one.

    get_model_config("opensora-v1.2-tiny")   -> that model's config (any family)
    family_of(config)                          -> its Family declaration (osx.families.base)
    component_specs(config)                    -> {component: ComponentSpec} at the model's full ranges
    config_from_manifest(manifest.model)       -> the config a bundle was exported from

Adding a family: its torch modules in export/, a declaration module here (see opensora_v1_2.py) added to
FAMILIES, a NumPy sampler in runtime/. README "Layout" says it step by step.
"""

from __future__ import annotations

from typing import Any

from osx.components import ComponentSpec
from osx.errors import BundleError, OsxError
from osx.families.base import (
    REFERENCE_DTYPES, ComponentDecl, Family, PromptDecl, SamplerDecl, TokenizerDecl, WeightSource, resolve,
)
from osx.families.opensora_v1_2 import OPENSORA_V1_2_FAMILY
from osx.families.opensora_v2_0 import OPENSORA_V2_0_FAMILY

FAMILIES: dict[str, Family] = {f.name: f for f in (OPENSORA_V1_2_FAMILY, OPENSORA_V2_0_FAMILY)}
MODELS: dict[str, Any] = {name: cfg for f in FAMILIES.values() for name, cfg in f.configs.items()}

__all__ = ["FAMILIES", "MODELS", "REFERENCE_DTYPES", "ComponentDecl", "Family", "PromptDecl", "SamplerDecl", "TokenizerDecl", "WeightSource",
           "component_names", "component_specs", "config_from_manifest", "family_of", "get_family", "get_model_config",
           "never_fp16", "quantizable", "resolve"]


def get_model_config(name: str):
    """A model's config by name, whatever its family; an OsxError listing the known names otherwise."""
    if name in MODELS:
        return MODELS[name]
    raise OsxError(f"unknown model {name!r}", hint=f"known models: {', '.join(sorted(MODELS))}")


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise OsxError(f"unknown model family {name!r}", hint=f"known families: {', '.join(sorted(FAMILIES))}") from None


def family_of(config) -> Family:
    return get_family(config.family)


def component_specs(config) -> dict[str, ComponentSpec]:
    """The specs of `config`'s components at its full supported ranges (profiles narrow them)."""
    return family_of(config).component_specs(config)


def never_fp16(component: str) -> str | None:
    """Why `component` must not run in float16, where a family says so (profiles are family-agnostic)."""
    return next((f.never_fp16[component] for f in FAMILIES.values() if component in f.never_fp16), None)


def quantizable(component: str) -> bool:
    return any(component in f.quantizable for f in FAMILIES.values())


def component_names() -> tuple[str, ...]:
    """Every component name some family declares (profiles may set a precision for each)."""
    return tuple(dict.fromkeys(c.name for f in FAMILIES.values() for c in f.components))


def config_from_manifest(model: dict):
    """The config a bundle's manifest records (`model`: {name, family, config})."""
    family = FAMILIES.get(model.get("family"))
    if family is None:
        raise BundleError(f"the bundle's model family {model.get('family')!r} is not one this osx knows",
                          hint=f"known families: {', '.join(sorted(FAMILIES))}; install the osx version that wrote it")
    try:
        return family.config_from_dict(model["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"the bundle's model config does not fit {family.name} ({type(e).__name__}: {e})",
                          hint="re-export the bundle with `osx export`") from None
