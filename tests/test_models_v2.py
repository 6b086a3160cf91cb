"""Open-Sora v2.0 model configs: resolution buckets, frame rule, latent shapes, the T5 shared with v1.2."""

import pytest

from osx.errors import InputError
from osx.models import OPENSORA_V1_2
from osx.models_v2 import (
    MODELS_V2, OPENSORA_V2_0, OPENSORA_V2_0_TINY, check_frames, image_size, latent_frames_v2, latent_shape,
)

# shared/design/opensora-v2.0.md section 1.2, H x W
DOC_BUCKETS = {
    "256px": {"16:9": (192, 336), "9:16": (336, 192), "1:1": (256, 256), "2.39:1": (160, 384), "1:2.39": (384, 160),
              "4:3": (224, 288), "3:2": (208, 304), "2:1": (176, 352)},
    "768px": {"16:9": (576, 1024), "9:16": (1024, 576), "1:1": (768, 768), "2.39:1": (496, 1184), "1:2.39": (1184, 496),
              "4:3": (656, 880), "3:2": (624, 928), "2:1": (544, 1072)},
}


@pytest.mark.parametrize("resolution", ["256px", "768px"])
def test_buckets_match_the_doc(resolution):
    for ratio, hw in DOC_BUCKETS[resolution].items():
        assert image_size(OPENSORA_V2_0, resolution, ratio) == hw, ratio


def test_latent_shapes_and_tokens():
    assert latent_shape(OPENSORA_V2_0, 192, 336, 129) == (16, 33, 24, 42)  # 252 tokens per latent frame
    assert latent_shape(OPENSORA_V2_0, 576, 1024, 129) == (16, 33, 72, 128)  # 2304
    assert [latent_frames_v2(f) for f in (1, 5, 33, 65, 129)] == [1, 2, 9, 17, 33]


def test_frame_rule():
    for f in (1, 5, 33, 129):
        check_frames(OPENSORA_V2_0, f)
    for f in (0, 2, 32, 130, 133):
        with pytest.raises(InputError, match="4k\\+1"):
            check_frames(OPENSORA_V2_0, f)


def test_bad_resolution_and_ratio():
    with pytest.raises(InputError, match="unknown resolution"):
        image_size(OPENSORA_V2_0, "512px", "16:9")
    with pytest.raises(InputError, match="not W:H"):
        image_size(OPENSORA_V2_0, "256px", "wide")


def test_t5_is_v1_2s_network_at_512_tokens():
    import dataclasses

    assert dataclasses.replace(OPENSORA_V2_0.t5, max_length=300) == OPENSORA_V1_2.text_encoder
    assert OPENSORA_V2_0.t5.max_length == 512


def test_tiny_keeps_the_structure():
    real, tiny = OPENSORA_V2_0.mmdit, OPENSORA_V2_0_TINY.mmdit
    assert (tiny.in_channels, tiny.patch_size, tiny.cond_channels, len(tiny.axes_dim)) == (64, 2, 68, 3)
    assert sum(tiny.axes_dim) == tiny.head_dim and tiny.depth >= 1 and tiny.depth_single_blocks >= 1
    assert tiny.vec_in_dim == OPENSORA_V2_0_TINY.clip.hidden_size and tiny.context_in_dim == OPENSORA_V2_0_TINY.t5.d_model
    assert real.vec_in_dim == OPENSORA_V2_0.clip.hidden_size and real.context_in_dim == OPENSORA_V2_0.t5.d_model
    assert set(MODELS_V2) == {"opensora-v2.0", "opensora-v2.0-tiny"}
    assert OPENSORA_V2_0_TINY.sampler.num_steps > OPENSORA_V2_0_TINY.sampler.osci_start


def test_model_names():
    from osx.errors import OsxError
    from osx.families import get_model_config
    from osx.models_v2 import get_model_config_v2

    assert get_model_config_v2("opensora-v2.0") is OPENSORA_V2_0
    assert get_model_config_v2("opensora-v2.0-tiny") is OPENSORA_V2_0_TINY
    # every stage reads the declared families (osx.families): v2.0 is one of them
    assert get_model_config("opensora-v2.0") is OPENSORA_V2_0
    with pytest.raises(OsxError, match="unknown model") as e:
        get_model_config("opensora-v9")
    assert "opensora-v2.0-tiny" in e.value.hint
    with pytest.raises(InputError, match="unknown Open-Sora v2.0 model"):
        get_model_config_v2("opensora-v1.2")


def test_config_round_trips_through_json():
    import json

    from osx.models_v2 import OpenSoraV2Config

    for cfg in (OPENSORA_V2_0, OPENSORA_V2_0_TINY):
        assert OpenSoraV2Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
