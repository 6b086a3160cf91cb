"""The whole Open-Sora v1.2 model in PyTorch: tokenizer, T5 encoder, STDiT3 denoiser and video VAE.

`build_reference` makes it from seeded random weights (the tiny model, tests, `--random-weights`) or
from the released checkpoint files. It is the oracle the exports, the runtime and the quantized engines
are measured against, so it always runs in float32 and eval mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer

from osx.errors import CheckpointError, OsxError
from osx.export.checkpoint import load_into, read_state_dict
from osx.export.init import seeded_init_, write_random_part
from osx.export.stdit3 import STDiT3
from osx.export.t5 import T5TextEncoder
from osx.export.tokenizer import build_tiny_tokenizer, convert_t5_sentencepiece
from osx.export.vae import VideoAutoencoder
from osx.models import ModelConfig


def random_init_std(model_cfg: ModelConfig) -> dict[str, float]:
    """Per-component std of random weights: 1/sqrt(fan-in) of the component's typical layer.

    Scaled like a standard fan-in init so that every input visibly moves a random model's output: with
    a flat 0.02 the tiny denoiser all but ignores its text (|v_cond - v_uncond| / |v| ~ 1e-4), and a
    guidance or text-path bug would pass the parity tests unnoticed; here it is ~0.1.
    """
    return {
        "t5": model_cfg.text_encoder.d_model**-0.5,
        "denoiser": model_cfg.denoiser.hidden_size**-0.5,
        "vae": (27 * model_cfg.vae.temporal.filters) ** -0.5,  # a 3x3x3 conv of the first level's width
    }


@dataclass
class ReferenceModel:
    model_cfg: ModelConfig
    text_encoder: T5TextEncoder
    denoiser: STDiT3
    vae: VideoAutoencoder
    tokenizer: Tokenizer


def build_reference(
    model_cfg: ModelConfig,
    *,
    seed: int | None = None,
    checkpoint: dict[str, str | os.PathLike] | None = None,
) -> ReferenceModel:
    """Build the reference model: random weights from `seed` (default: the config's `random_init_seed`)
    or, with `checkpoint` = {"denoiser": path, "vae": path, "t5": folder}, the released weights.

    Random weights: every component gets `seeded_init_(module, seed, std)` with the std of
    `random_init_std` (values depend only on the seed, the std and the parameter names), and the
    tokenizer is the deterministic tiny one for the config's vocabulary.
    """
    if checkpoint is not None and seed is not None:
        raise OsxError("give either a seed (random weights) or a checkpoint, not both")
    modules = {part: factory() for part, factory in part_factories(model_cfg).items()}
    if checkpoint is None:
        seed = model_cfg.random_init_seed if seed is None else seed
        stds = random_init_std(model_cfg)
        for part, module in modules.items():
            seeded_init_(module, seed, std=stds[part])
    else:
        missing = [part for part in modules if part not in checkpoint]  # the family's weight sources (osx.families)
        if missing:
            raise CheckpointError(
                f"checkpoint is missing {', '.join(missing)}",
                hint="give the paths of all of: " + ", ".join(modules),
            )
        for part, module in modules.items():
            load_into(module, read_state_dict(checkpoint[part]), source=str(checkpoint[part]))
    tokenizer = build_tokenizer(model_cfg, checkpoint)
    for module in modules.values():
        module.float().eval().requires_grad_(False)
    return ReferenceModel(
        model_cfg=model_cfg,
        text_encoder=modules["t5"],
        denoiser=modules["denoiser"],
        vae=modules["vae"],
        tokenizer=tokenizer,
    )


# --- one part at a time (the streamed export) ----------------------------------------------------------


def part_factories(model_cfg: ModelConfig) -> dict[str, Callable[[], torch.nn.Module]]:
    """How to build each checkpoint part's torch module (weights left to the caller)."""
    return {
        "t5": lambda: T5TextEncoder(model_cfg.text_encoder),
        "denoiser": lambda: STDiT3(model_cfg.denoiser, model_cfg.scheduler.reference_dtype),
        "vae": lambda: VideoAutoencoder(model_cfg.vae),
    }


def build_tokenizer(model_cfg: ModelConfig, checkpoint: dict[str, str | os.PathLike] | None) -> Tokenizer:
    """The tiny deterministic tokenizer for random weights; the T5 folder's sentencepiece model, converted."""
    if checkpoint is None:
        return build_tiny_tokenizer(model_cfg.text_encoder)
    return convert_t5_sentencepiece(Path(checkpoint["t5"]) / "spiece.model")


def write_random_checkpoint(model_cfg: ModelConfig, part: str, path: str | os.PathLike, dtype: torch.dtype,
                            seed: int | None = None) -> Path:
    """The seeded random weights of one part (exactly `build_reference`'s values, cast to `dtype`) as a
    safetensors file with the released checkpoint's tensor names (osx.export.init.write_random_part)."""
    seed = model_cfg.random_init_seed if seed is None else seed
    return write_random_part(part_factories(model_cfg)[part], path, dtype, seed, random_init_std(model_cfg)[part])


def tokenizers(model_cfg: ModelConfig, checkpoint: dict[str, str | os.PathLike] | None) -> dict[str, Tokenizer]:
    """{text encoder component: tokenizer} (the exporter writes each into the bundle)."""
    return {"text_encoder": build_tokenizer(model_cfg, checkpoint)}
