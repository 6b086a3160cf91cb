"""Seeded random weights for `--random-weights` and the tests.

Each tensor gets its own generator seeded from (seed, tensor name), so the values depend only on the
seed and the parameter names, not on the order modules were built or on the global RNG.

Scales: by default every weight matrix (and conv kernel, embedding table, modulation table) is drawn
from N(0, 1/sqrt(fan_in)), which keeps activations at unit scale at any width: a fixed N(0, 0.02) leaves
the tiny test models nearly inert (their text, timestep and attention paths shrink by ~0.15 per layer),
so parity tests would not see errors there. Norm scales are 1 + N(0, 0.02), biases N(0, 0.02).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

SMALL_STD = 0.02  # biases and the jitter of norm scales

# Buffers that are learned weights in a checkpoint (not constants) and so get random values too:
# STDiT3's null caption `y_embedder.y_embedding`.
LEARNED_BUFFERS = ("y_embedding",)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def seeded_targets(module: torch.nn.Module, learned_buffers: tuple[str, ...] = LEARNED_BUFFERS) -> list[tuple[str, torch.Tensor]]:
    """The tensors random weights fill: trainable parameters (each tied tensor once, under its first
    name) and learned buffers. Frozen parameters and other buffers are constants of the architecture."""
    targets = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return targets + [(n, b) for n, b in module.named_buffers() if n.rpartition(".")[2] in learned_buffers]


def seeded_value(module: torch.nn.Module, name: str, shape: tuple[int, ...], seed: int, std: float | None = None) -> torch.Tensor:
    """The float32 random value of tensor `name` (see `seeded_init_`); needs only the module's structure,
    so it works on a module whose parameters are on the meta device."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    values = torch.randn(shape, generator=tensor_generator(seed, name))
    if leaf in ("weight", "scale") and "Norm" in type(owner).__name__:
        return 1.0 + SMALL_STD * values
    if len(shape) < 2:  # biases
        return SMALL_STD * values
    return values * (std if std is not None else (values.numel() // shape[0]) ** -0.5)


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int, std: float | None = None, learned_buffers: tuple[str, ...] = LEARNED_BUFFERS):
    """Fill `module`'s trainable parameters and learned buffers in place; returns `module`.

    `std`: None for N(0, 1/sqrt(fan_in)) weights (see the module docstring), or one fixed standard
    deviation for every weight.

    Frozen parameters (requires_grad=False, e.g. RoPE's `rope.freqs`) and other buffers are constants
    of the architecture and keep their values. Parameters named `weight` (or `scale`) of a module whose
    class name contains "Norm" are scales and are drawn around 1. Tied parameters are filled once.
    """
    for name, tensor in seeded_targets(module, learned_buffers):
        tensor.copy_(seeded_value(module, name, tuple(tensor.shape), seed, std))
    return module


def write_random_part(factory: Callable[[], torch.nn.Module], path: str | os.PathLike, dtype: torch.dtype, seed: int,
                      std: float | None = None) -> Path:
    """The seeded random weights of the module `factory` builds (exactly `seeded_init_(module, seed, std)`'s
    values, cast to `dtype`) as a safetensors file with the module's tensor names, written one tensor at a
    time: a model larger than RAM gets its random checkpoint without ever being built."""
    from osx.export.checkpoint import tied_names, write_safetensors_streamed
    from osx.export.stream import trainable_params_on_meta

    with trainable_params_on_meta():
        module = factory()
    random = {name for name, _ in seeded_targets(module)}
    state, aliases, tensors = module.state_dict(keep_vars=True), tied_names(module), {}
    for name, t in state.items():
        if not any(a in tensors for a in aliases.get(name, ())):  # a tied tensor is stored once
            tensors[name] = (tuple(t.shape), dtype if t.is_floating_point() else t.dtype)

    def make(name: str) -> torch.Tensor:
        if name in random:
            return seeded_value(module, name, tensors[name][0], seed, std)
        return state[name].detach()  # a constant the module computes (RoPE frequencies, VAE scale/shift)

    return write_safetensors_streamed(path, tensors, make)
