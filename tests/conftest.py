"""Shared test setup. Every test runs on tiny configs with seeded random weights built here."""

import importlib.util
import shutil

import pytest


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'osx[tensorrt]' on a machine with an NVIDIA GPU)"
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU / driver found (nvidia-smi missing)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
