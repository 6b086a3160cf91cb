import json
import subprocess
import sys

import numpy as np
import pytest

from osx.components import ComponentSpec, DimRange
from osx.families import component_specs
from osx.errors import InputError, OsxError
from osx.models import MODELS, ModelConfig, get_model_config, latent_frames


def test_cli_help_and_version():
    out = subprocess.run([sys.executable, "-m", "osx", "--help"], capture_output=True, text=True, check=True).stdout
    assert "Usage" in out
    out = subprocess.run([sys.executable, "-m", "osx", "--version"], capture_output=True, text=True, check=True).stdout
    import osx

    assert osx.__version__ in out


def test_unknown_model_lists_known():
    with pytest.raises(OsxError) as e:
        get_model_config("opensora-v9")
    assert "opensora-v1.2-tiny" in e.value.hint


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_config_json_round_trip(name):
    cfg = MODELS[name]
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("frames,expected", [(1, 1), (17, 5), (34, 10), (51, 15), (102, 30), (204, 60), (408, 120), (20, 6)])
def test_latent_frames_formula(frames, expected):
    # T_lat = 5*floor(F/17) + ceil((F mod 17)/4), shared notes 1.4
    assert latent_frames(frames) == expected


def test_component_spec_round_trip_and_checks():
    specs = component_specs(get_model_config("opensora-v1.2-tiny"))
    for spec in specs.values():
        again = ComponentSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again.to_dict() == spec.to_dict()  # the manifest states concrete dtypes
        inputs = spec.sample_inputs(seed=1)
        sizes = spec.sizes_of(inputs)
        assert sizes == {d: r.opt for d, r in spec.dims.items()}
    den = specs["denoiser"]
    with pytest.raises(InputError, match="latent_frames=99 is outside"):
        den.check({"latent_frames": 99})
    narrowed = den.with_dims(latent_frames=DimRange(5, 5, 5))
    assert narrowed.dims["latent_frames"].max == 5 and den.dims["latent_frames"].max != 5
    mask = den.sample_inputs(seed=3)["mask"]
    assert mask.dtype == np.int64 and (mask[:, 0] == 1).all()
