"""A calibration set on disk: what `osx calibrate` writes and `osx export --calibration` reads.

    calib/
      calibration.json                  recipe, its hash, timesteps, shard lists
      calibration/<component>-NNNNN.npz activations of the calibration prompts
      heldout/<component>-NNNNN.npz     activations of the held-out prompts (the quality gate's inputs)

The recipe is everything that decides the shards' contents (model and weights, prompts, seeds, the
sampled steps and their timesteps, resolution, frames, guidance, shard cap); its sha256 is the
calibration hash that quantized bundles and engine keys carry. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from osx.errors import OsxError

FORMAT, FORMAT_VERSION = "osx-calibration", 1
MANIFEST = "calibration.json"
SPLITS = ("calibration", "heldout")


def weights_identity(random_seed: int, checkpoint: dict[str, str | os.PathLike] | None) -> str:
    """What the activations were captured from, as `osx calibrate` and `osx export` both name it:
    "random:seed=N" or "checkpoint:denoiser=/abs/path;t5=...;vae=..."."""
    if checkpoint is None:
        return f"random:seed={random_seed}"
    return "checkpoint:" + ";".join(f"{k}={Path(v).resolve()}" for k, v in sorted(checkpoint.items()))


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class CalibrationSet:
    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest

    @classmethod
    def open(cls, path: str | os.PathLike) -> "CalibrationSet":
        root = Path(path)
        hint = "create one with `osx calibrate --model ... --out DIR` and pass that DIR"
        if not (root / MANIFEST).is_file():
            raise OsxError(f"{root} is not a calibration set (no {MANIFEST})", hint=hint)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise OsxError(f"{root / MANIFEST} is not valid JSON: {e}", hint=hint) from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise OsxError(f"{root / MANIFEST}: not an {FORMAT} v{FORMAT_VERSION} manifest", hint=hint)
        if recipe_hash(manifest["recipe"]) != manifest["hash"]:
            raise OsxError(f"{root / MANIFEST}: the recipe does not match its hash (edited by hand?)", hint=hint)
        cs = cls(root, manifest)
        for split in SPLITS:
            for comp in cs.components(split):
                missing = [p for p in cs.shards(split, comp) if not p.is_file()]
                if missing:
                    raise OsxError(f"calibration set {root} is missing {missing[0].relative_to(root)}", hint=hint)
        return cs

    @property
    def hash(self) -> str:
        return self.manifest["hash"]

    @property
    def recipe(self) -> dict:
        return self.manifest["recipe"]

    def components(self, split: str = "calibration") -> list[str]:
        return list(self.manifest["shards"].get(split, {}))

    def shards(self, split: str, component: str) -> list[Path]:
        records = self.manifest["shards"].get(split, {}).get(component)
        if not records:
            raise OsxError(f"calibration set {self.root} has no {split} samples for {component}",
                           hint="re-run `osx calibrate` with this osx version")
        return [self.root / split / r["file"] for r in records]

    def count(self, split: str, component: str) -> int:
        """Samples of `component` in `split`."""
        return sum(r["samples"] for r in self.manifest["shards"].get(split, {}).get(component, []))

    def check_model(self, model_name: str, weights: str | None = None) -> None:
        """Refuse a set captured from another model (or other weights, when both are known)."""
        got = self.recipe["model"]
        if got["name"] != model_name or (weights is not None and got["weights"] != weights):
            raise OsxError(
                f"calibration set {self.root} was captured from {got['name']} ({got['weights']}), "
                f"not {model_name}{f' ({weights})' if weights else ''}",
                hint="re-run `osx calibrate` with the model you export",
            )
