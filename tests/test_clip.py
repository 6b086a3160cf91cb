"""CLIP ViT-L/14 text tower: a plain re-derivation (float64, 1e-5), the pooled-token rule, the real layout
on the meta device, and the tiny tokenizer's CLIP layout."""

import math

import pytest
import torch

from osx.export.clip import CLIPTextEncoder, build_tiny_clip_tokenizer
from osx.export.init import seeded_init_
from osx.models_v2 import OPENSORA_V2_0, OPENSORA_V2_0_TINY
from osx.runtime.tokenizer import PromptTruncatedWarning, TextTokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CFG = OPENSORA_V2_0_TINY.clip


@pytest.fixture(scope="module")
def encoder():
    return seeded_init_(CLIPTextEncoder(CFG), seed=0).eval()


def ids_for(*prompts):
    tok = TextTokenizer(build_tiny_clip_tokenizer(CFG), CFG.max_length, pad_token="<|endoftext|>")
    return torch.from_numpy(tok.encode(list(prompts))[0])


def ref_pooled(enc, ids):
    """Pre-LN causal transformer written out: x = tok + pos; per layer x += out(attn(LN1 x)),
    x += fc2(quick_gelu(fc1(LN2 x))); final LN; the state at the first EOS."""
    tm = enc.text_model
    p = {k: v.double() for k, v in tm.state_dict().items()}

    def ln(x, name):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + CFG.layer_norm_eps) * p[name + ".weight"] + p[name + ".bias"]

    def lin(x, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    B, L = ids.shape
    H, D = CFG.num_attention_heads, CFG.hidden_size // CFG.num_attention_heads
    x = p["embeddings.token_embedding.weight"][ids] + p["embeddings.position_embedding.weight"][:L]
    causal = torch.triu(torch.full((L, L), -math.inf, dtype=torch.float64), 1)
    for n in range(CFG.num_hidden_layers):
        pre = f"encoder.layers.{n}."
        a = ln(x, pre + "layer_norm1")
        q, k, v = (lin(a, pre + f"self_attn.{c}_proj").reshape(B, L, H, D).transpose(1, 2) for c in "qkv")
        s = q @ k.transpose(-1, -2) / math.sqrt(D) + causal
        w = torch.exp(s - s.max(-1, keepdim=True).values)
        o = ((w / w.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(B, L, H * D)
        x = x + lin(o, pre + "self_attn.out_proj")
        h = lin(ln(x, pre + "layer_norm2"), pre + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), pre + "mlp.fc2")
    x = ln(x, "final_layer_norm")
    first_eos = [row.tolist().index(CFG.eos_token_id) for row in ids]
    return x[torch.arange(B), first_eos]


def test_pooled_output_is_the_rederivation(encoder):
    ids = ids_for("a red car on a wet road at night.", "")
    with torch.no_grad():
        got = encoder(ids)
    want = ref_pooled(encoder, ids)
    assert got.shape == (2, CFG.hidden_size)
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 1e-5, err


def test_pooled_token_is_the_first_eos(encoder):
    ids = ids_for("a dog runs.")
    eos = ids[0].tolist().index(CFG.eos_token_id)
    assert ids[0, 0] == CFG.bos_token_id and (ids[0, eos:] == CFG.eos_token_id).all()  # padded with EOS
    changed = ids.clone()
    changed[0, eos + 1:] = 7  # whatever follows the first EOS is invisible to it (causal attention)
    with torch.no_grad():
        assert torch.equal(encoder(ids), encoder(changed))
        changed[0, eos - 1] = 7
        assert not torch.equal(encoder(ids), encoder(changed))


def test_tiny_tokenizer_layout_and_truncation():
    with pytest.warns(PromptTruncatedWarning):
        ids = ids_for("word " * 100)[0].tolist()
    assert len(ids) == CFG.max_length and ids[0] == CFG.bos_token_id and ids[-1] == CFG.eos_token_id
    assert CFG.eos_token_id not in ids[1:-1]
    assert build_tiny_clip_tokenizer(CFG).to_str() == build_tiny_clip_tokenizer(CFG).to_str()


def test_real_clip_text_tower_on_meta():
    with torch.device("meta"):
        enc = CLIPTextEncoder(OPENSORA_V2_0.clip)
    sd = {k: list(v.shape) for k, v in enc.state_dict().items()}
    assert len(sd) == 196 and sum(p.numel() for p in enc.parameters()) == 123_060_480
    assert sd["text_model.embeddings.token_embedding.weight"] == [49408, 768]
    assert sd["text_model.embeddings.position_embedding.weight"] == [77, 768]
    assert sd["text_model.encoder.layers.11.self_attn.q_proj.weight"] == [768, 768]
    assert sd["text_model.encoder.layers.11.mlp.fc1.weight"] == [3072, 768]
    assert sd["text_model.final_layer_norm.bias"] == [768]
    assert all(k.startswith("text_model.") for k in sd)
