"""T5 text encoder: transformers' T5EncoderModel layout and results, DeepFloyd-style shards, ONNX export."""

import json

import numpy as np
import pytest
import torch
from transformers import T5EncoderModel

from osx.families import component_specs
from osx.models import OPENSORA_V1_2, OPENSORA_V1_2_TINY
from osx.export.checkpoint import load_into, read_state_dict
from osx.export.init import seeded_init_
from osx.export.t5 import T5TextEncoder, t5_config

CFG = OPENSORA_V1_2_TINY.text_encoder


@pytest.fixture(scope="module")
def encoder():
    return seeded_init_(T5TextEncoder(CFG), seed=3).eval()


def tokens(B, L, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return torch.randint(2, CFG.vocab_size, (B, L), generator=g) * mask, mask


@pytest.mark.parametrize("B,L,lengths", [(1, 32, [32]), (2, 32, [5, 20]), (2, 7, [7, 3])])
def test_forward_shapes(encoder, B, L, lengths):
    ids, mask = tokens(B, L, lengths)
    with torch.no_grad():
        out = encoder(ids, mask)
    assert out.shape == (B, L, CFG.d_model) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 0.1


def test_matches_transformers_t5_encoder_model(encoder):
    reference = T5EncoderModel(t5_config(CFG)).eval()
    reference.load_state_dict(encoder.state_dict())
    ids, mask = tokens(2, 32, [9, 32])
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), reference(input_ids=ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0)


def test_padding_does_not_change_real_tokens(encoder):
    ids, mask = tokens(1, 32, [9])
    other = ids.clone()
    other[0, 9:] = 77  # different ids under the padding
    with torch.no_grad():
        torch.testing.assert_close(encoder(other, mask)[:, :9], encoder(ids, mask)[:, :9], rtol=1e-6, atol=1e-6)


def test_real_config_on_meta():
    with torch.device("meta"):
        real = T5TextEncoder(OPENSORA_V1_2.text_encoder)
    assert sum(p.numel() for p in real.parameters()) == 4_762_310_656
    keys = real.state_dict().keys()
    assert {"shared.weight", "encoder.final_layer_norm.weight", "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"} <= set(keys)
    assert not any(k.startswith("encoder.block.24") for k in keys)
    assert real.shared.weight.shape == (32128, 4096)


def test_loads_deepfloyd_style_bin_shards(encoder, tmp_path):
    """DeepFloyd/t5-v1_1-xxl ships `pytorch_model-0000N-of-00002.bin` + `pytorch_model.bin.index.json`,
    without the tied `encoder.embed_tokens.weight`."""
    state = {k: v.clone() for k, v in encoder.state_dict().items() if k != "encoder.embed_tokens.weight"}
    keys = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2], "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    fresh = seeded_init_(T5TextEncoder(CFG), seed=99).eval()
    load_into(fresh, read_state_dict(tmp_path), source=str(tmp_path))
    ids, mask = tokens(2, 32, [4, 30])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, mask), encoder(ids, mask), rtol=0, atol=0)


def test_loads_transformers_save_pretrained_shards(encoder, tmp_path):
    reference = T5EncoderModel(t5_config(CFG))
    reference.load_state_dict(encoder.state_dict())
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    fresh = T5TextEncoder(CFG).eval()
    load_into(fresh, read_state_dict(tmp_path), source=str(tmp_path))
    ids, mask = tokens(1, 32, [11])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, mask), encoder(ids, mask), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:Exporting aten")  # T5 indexes with non-negative indices only
def test_onnx_export_matches_torch(encoder, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    spec = component_specs(OPENSORA_V1_2_TINY)["text_encoder"]
    names = [t.name for t in spec.inputs]
    sample = spec.sample_inputs(seed=0)
    path = tmp_path / "text_encoder.onnx"
    torch.onnx.export(
        encoder, tuple(torch.from_numpy(sample[n]) for n in names), path, input_names=names,
        output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(), opset_version=20, dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        feed = spec.sample_inputs({"batch": batch}, seed=batch)
        with torch.no_grad():
            expected = encoder(*(torch.from_numpy(feed[n]) for n in names)).numpy()
        got = session.run(None, feed)[0]
        assert got.shape == (batch, CFG.max_length, CFG.d_model)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
