"""The weights options `osx export` and `osx calibrate` share: --random-weights, --checkpoint DIR, and one
--PART PATH option per checkpoint part some model family declares (osx.families WeightSource), so a family
that declares a new part gets its option without a CLI edit."""

from __future__ import annotations

from pathlib import Path

import click

from osx.families import FAMILIES

PREFIX = "weights_"  # the parameter names of the --PART options: weights_<part>


def _parts() -> dict[str, list]:
    """part -> [(family name, its WeightSource)], over every family, in declaration order."""
    parts: dict[str, list] = {}
    for family in FAMILIES.values():
        for source in family.weights:
            parts.setdefault(source.part, []).append((family.name, source))
    return parts


def weight_options(command):
    """Add the weights options to a click command (its function takes **weights and calls `weight_files`)."""
    for part, declared in reversed(list(_parts().items())):
        option = declared[0][1].option
        said = "; ".join(dict.fromkeys(f"{s.description} ({f})" for f, s in declared))
        command = click.option(option, f"{PREFIX}{part}", type=click.Path(path_type=Path), default=None,
                               help=f"{said}: a file or folder (overrides --checkpoint).")(command)
    command = click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                           help="Folder holding the model's weights (each part a file or subfolder, recognised by its "
                           "tensor names, or its file name).")(command)
    return click.option("--random-weights", is_flag=True,
                        help="Seeded random weights instead of a checkpoint (tests, dry runs).")(command)


def weight_files(random_weights: bool, checkpoint: Path | None, weights: dict):
    """The WeightFiles the options name (`weights`: the command's **weights keyword arguments)."""
    from osx.export.request import WeightFiles

    parts = {k.removeprefix(PREFIX): v for k, v in weights.items() if k.startswith(PREFIX) and v is not None}
    return WeightFiles(checkpoint=checkpoint, parts=parts, random=random_weights)
