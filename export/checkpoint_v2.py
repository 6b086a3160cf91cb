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
from osx.export.checkpoint import PICKLE_SUFFIXES, CheckpointReader, check_fit, tensor_names
from osx.export.clip import CLIP_UNUSED_PREFIXES

PARTS = ("mmdit", "vae", "t5", "clip")  # required
OPTIONAL_PARTS = ("flux", "flux_ae")  # t2i2v only; found and checked like the others, missing is no error
RELEASED_NAMES = {
    "mmdit": "Open_Sora_v2.safetensors",
    "vae": "hunyuan_vae.safetensors",
    "t5": "google/t5-v1_1-xxl",
    "clip": "openai/clip-vit-large-patch14",
    "flux": "flux1-dev.safetensors",
    "flux_ae": "flux1-dev-ae.safetensors",
}
PART_NAMES = {"mmdit": "MMDiT weights", "vae": "HunyuanVideo VAE weights", "t5": "T5 folder", "clip": "CLIP folder",
              "flux": "Flux.1-dev weights", "flux_ae": "Flux autoencoder weights"}
# Keys a released file holds beyond what osx's module uses (the rest of a Hugging Face model).
UNUSED_PREFIXES = {"mmdit": (), "vae": (), "t5": ("decoder.", "lm_head."), "clip": CLIP_UNUSED_PREFIXES, "flux": (),
                   "flux_ae": ("encoder.",)}
# Names to fall back on when a pickle's tensor names cannot be read without loading it.
NAME_HINTS = {"mmdit": ("open_sora", "mmdit"), "vae": ("hunyuan", "vae"), "t5": ("t5",), "clip": ("clip",),
              "flux": ("flux1-dev.",), "flux_ae": ("flux1-dev-ae",)}
MAX_DEPTH = 3  # ckpts/google/t5-v1_1-xxl/<weights>


def identify(keys: list[str]) -> str | None:
    """Which part a state dict is, from its tensor names: one of PARTS + OPTIONAL_PARTS ("flux": Flux.1-dev,
    the same class with fused q/k/v and no cond_in; "flux_ae": its autoencoder, BFL's `down.N`/`up.N`
    names), or None."""
    keys = [k.removeprefix("module.") for k in keys]
    if any(k.startswith("double_blocks.") for k in keys):
        return "mmdit" if "cond_in.weight" in keys else "flux"
    if any(k.startswith("encoder.down_blocks.") for k in keys) and any(k.startswith("decoder.up_blocks.") for k in keys):
        return "vae"
    if any(k.startswith("decoder.up.") for k in keys) and any(k.startswith("decoder.mid.attn_1.") for k in keys):
        return "flux_ae"
    if any(k.startswith("text_model.encoder.layers.") for k in keys):
        return "clip"
    if any(k.startswith("encoder.block.") for k in keys):
        return "t5"
    return None


def find_parts(folder: str | os.PathLike) -> dict[str, Path]:
    """{part: path} for every part found in `folder` or its subfolders (to depth 3), by tensor names where
    they can be read without loading weights (safetensors headers, shard indexes), else by file name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist or is not a folder",
                              hint="pass the folder holding " + ", ".join(RELEASED_NAMES.values()))
    found: dict[str, Path] = {}
    for entry, keys in _weight_entries(folder, MAX_DEPTH):
        part = identify(keys) if keys else _by_name(entry)
        if part is None:
            continue
        if part in found:
            raise CheckpointError(f"{folder} holds two {PART_NAMES[part]}: {found[part]} and {entry}",
                                  hint=f"keep one, or pass --{part} PATH")
        found[part] = entry
    return found


def resolve_parts(folder: str | os.PathLike | None = None, **paths) -> dict[str, Path]:
    """All four parts, and Flux.1-dev where present: explicit `paths` (mmdit=..., vae=..., t5=..., clip=...,
    flux=...) win over what `folder` holds."""
    parts = {k: Path(v) for k, v in paths.items() if v is not None}
    unknown = set(parts) - set(PARTS + OPTIONAL_PARTS)
    if unknown:
        raise CheckpointError(f"unknown checkpoint part(s) {', '.join(sorted(unknown))}",
                              hint=f"parts: {', '.join(PARTS + OPTIONAL_PARTS)}")
    if folder is not None:
        parts = {**find_parts(folder), **parts}
    missing = [p for p in PARTS if p not in parts]
    if missing:
        raise CheckpointError(
            "no " + ", ".join(PART_NAMES[p] for p in missing) + (f" in {folder}" if folder else ""),
            hint="released names: " + ", ".join(f"{RELEASED_NAMES[p]} ({p})" for p in missing),
        )
    for part, path in parts.items():
        if not path.exists():
            raise CheckpointError(f"{PART_NAMES[part]} {path} does not exist", hint=f"check the {part} path")
    return parts


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


def _weight_entries(folder: Path, depth: int):
    """(entry, tensor names) of each weights file or model folder under `folder`; names [] for pickles."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            keys = _folder_keys(entry)
            if keys is not None:
                yield entry, keys
            elif depth > 1:
                yield from _weight_entries(entry, depth - 1)
        elif entry.name.endswith(".index.json") or entry.suffix == ".safetensors" or entry.suffix in PICKLE_SUFFIXES:
            yield entry, tensor_names(entry)


def _folder_keys(folder: Path) -> list[str] | None:
    """Tensor names of a model folder (what read_state_dict(folder) reads); None if it holds no weights."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for group in ([p for p in files if p.name.endswith(".index.json")], [p for p in files if p.suffix == ".safetensors"],
                  [p for p in files if p.suffix in PICKLE_SUFFIXES]):
        if group:
            return tensor_names(group[0]) if len(group) == 1 else []
    return None


def _by_name(entry: Path) -> str | None:
    name = entry.name.lower()
    for part, hints in NAME_HINTS.items():
        if any(h in name for h in hints):
            return part
    return None
