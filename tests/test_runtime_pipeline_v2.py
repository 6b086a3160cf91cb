"""The torch-free Open-Sora v2.0 pipeline (runtime/pipeline_v2.py): its NumPy pieces against the torch
reference's (RoPE tables, tile counts).

Tolerances: RoPE tables 1e-6 absolute (float32 cos/sin of the same float32 angles in NumPy and torch);
tile counts exact."""

import dataclasses

import numpy as np
import pytest

from osx.models_v2 import FLUX1_DEV_TINY, HUNYUAN_VAE, OPENSORA_V2_0_TINY as TINY
from osx.runtime.pipeline_v2 import decode_tile_count, rope_tables
from osx.vae_tiling import tiled_decode


@pytest.mark.parametrize("mmdit", [TINY.mmdit, FLUX1_DEV_TINY], ids=["rotate-half", "interleaved"])
def test_rope_tables_equal_the_torch_models(mmdit):
    pytest.importorskip("torch")
    from osx.export.mmdit import video_rope

    cos, sin = rope_tables(mmdit, 3, 4, 5)  # the image tokens' (the text tokens' rotation is the identity)
    want_cos, want_sin = (t[0, 7:].numpy() for t in video_rope(mmdit, 7, 3, 4, 5))
    assert cos.shape == want_cos.shape == (3 * 4 * 5, mmdit.head_dim) and cos.dtype == sin.dtype == np.float32
    np.testing.assert_allclose(cos, want_cos, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, want_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape,temporal", [((1, 16, 3, 8, 8), False), ((1, 16, 3, 12, 8), False), ((1, 16, 3, 20, 13), False),
                                            ((1, 16, 9, 12, 12), True), ((1, 16, 3, 4, 4), True)])
def test_decode_tile_count_is_the_number_of_decoder_calls(shape, temporal):
    vae = dataclasses.replace(TINY.vae, use_temporal_tiling=temporal, sample_tsize=8)
    calls = []

    def decode(z):
        calls.append(z.shape)
        T = 1 + 4 * (z.shape[2] - 1)
        return np.zeros((z.shape[0], 3, T, 8 * z.shape[3], 8 * z.shape[4]), np.float32)

    tiled_decode(decode, np.zeros(shape, np.float32), vae, vae.use_spatial_tiling, temporal)
    assert decode_tile_count(vae, shape) == len(calls)


def test_decode_tile_count_at_real_size():
    """Design doc 4.3: 256px 16:9 (latent 24x42) decodes as 1x2 tiles, 768px 16:9 (72x128) as 3x6."""
    assert decode_tile_count(HUNYUAN_VAE, (1, 16, 33, 24, 42)) == 2
    assert decode_tile_count(HUNYUAN_VAE, (1, 16, 33, 72, 128)) == 18
    assert decode_tile_count(HUNYUAN_VAE, (1, 16, 33, 32, 32)) == 1


def test_a_v1_2_bundle_refuses_v2_0_sizes_and_the_v2_0_pipeline(tiny_bundle):
    from osx.errors import BundleError, InputError
    from osx.runtime.pipeline import Pipeline
    from osx.runtime.pipeline_v2 import PipelineV2

    pipe = Pipeline.load(tiny_bundle, verify=False)
    assert type(pipe) is Pipeline
    with pytest.raises(InputError, match="takes a size as width x height.*'256px'"):
        pipe.prepare_request("x", resolution="256px")
    with pytest.raises(InputError, match="not a resolution name or aspect ratio \\('16:9'\\)"):
        pipe.prepare_request("x", aspect_ratio="16:9")
    with pytest.raises(BundleError, match="opensora-v1.2 samples with 'rectified-flow-v1.2'; PipelineV2 runs 'rectified-flow-v2.0'"):
        PipelineV2.load(tiny_bundle, verify=False)
