"""Open-Sora v2.0 checkpoints: find the four parts by their tensor names and load each one strictly.

Released layout (hpcai-tech/Open-Sora-v2 plus two Hugging Face folders):
  Open_Sora_v2.safetensors        MMDiT          (Open-Sora loads it with strict=False: a renamed key would
                                                  silently keep random weights; osx refuses instead)
  hunyuan_vae.safetensors         VAE
  google/t5-v1_1-xxl/             T5 (the whole encoder-decoder model; the decoder and LM head are unused)
  openai/clip-vit-large-patch14/  CLIP (the whole model; the vision tower and projections are unused)
  flux1-dev.safetensors           Flux.1-dev, the t2i2v image model (optional: same MMDiT class, BFL's names)
  flux1-dev-ae.safetensors        Flux's image autoencoder (optional, t2i2v; the encoder half is unused)

Every part must match its module key for key: missing, unexpected (beyond the unused halves above) and
wrong-shape keys are listed in a CheckpointError (exit 2).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from osx.errors import CheckpointError
from osx.export import checkpoint
from osx.export.checkpoint import CheckpointReader, check_fit, identify_part
from osx.families.opensora_v2_0 import OPENSORA_V2_0_FAMILY

# The parts (osx/families/opensora_v2_0.py): the four, then Flux.1-dev and its autoencoder for t2i2v, optional
# (found and checked like the others, missing is no error).
WEIGHTS = OPENSORA_V2_0_FAMILY.weights
PARTS = tuple(w.part for w in WEIGHTS if w.required)
OPTIONAL_PARTS = tuple(w.part for w in WEIGHTS if not w.required)
RELEASED_NAMES = {w.part: w.released_name for w in WEIGHTS}
PART_NAMES = {w.part: w.description for w in WEIGHTS}
# Keys a released file holds beyond what osx's module uses (the rest of a Hugging Face model).
UNUSED_PREFIXES = {w.part: w.unused_prefixes for w in WEIGHTS}


def identify(keys: list[str]) -> str | None:
    """Which part a state dict is, from its tensor names ("flux": Flux.1-dev, the same class with fused
    q/k/v and no cond_in; "flux_ae": its autoencoder, BFL's `down.N`/`up.N` names), or None."""
    return identify_part(keys, WEIGHTS)


def find_parts(folder: str | os.PathLike) -> dict[str, Path]:
    """{part: path} for every part found in `folder` or its subfolders (osx.export.checkpoint.find_parts)."""
    return checkpoint.find_parts(folder, WEIGHTS)


def resolve_parts(folder: str | os.PathLike | None = None, **paths) -> dict[str, Path]:
    """All four parts, and Flux.1-dev where present: explicit `paths` (mmdit=..., vae=..., t5=..., clip=...,
    flux=...) win over what `folder` holds."""
    return checkpoint.resolve_parts(WEIGHTS, folder, paths)


def load_part(module: torch.nn.Module, path: str | os.PathLike, part: str, dtype: torch.dtype | None = None) -> None:
    """Load `path` into `module` strictly, after dropping the part's known unused keys.

    Names and shapes are checked from the file's header before any tensor is read; then the tensors are
    read one at a time, each cast to `dtype` (default: the module's) on the way. A module built on the
    meta device takes them as its parameters, so loading holds the weights once, in the target dtype
    (the 19 GB float32 T5 file becomes 9.5 GB of bf16 without a float32 copy of the whole).
    """
    reader = CheckpointReader(path)
    kind = identify(reader.keys())
    if kind is not None and kind != part:
        raise CheckpointError(f"{path} holds {PART_NAMES[kind]}, not {PART_NAMES[part]}",
                              hint=f"pass it as the {kind} part; {PART_NAMES[part]} ship as {RELEASED_NAMES[part]}")
    keys = [k for k in reader.keys() if not k.startswith(UNUSED_PREFIXES[part])]
    check_fit(module, {k: reader.shape(k) for k in keys}, str(path), recomputable=())
    on_meta = any(p.is_meta for p in module.parameters())
    target = dtype or next(module.parameters()).dtype
    state = {k: reader.get(k).to(target) for k in keys}
    with torch.no_grad():
        module.load_state_dict(state, strict=False, assign=on_meta)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a non-persistent buffer has no value in any checkpoint: such modules must not be built on meta
        raise CheckpointError(f"{path}: {', '.join(left[:5])} still unset after loading", hint="an osx bug: please report it")
