"""Flux AE decoder (t2i2v's first-frame decoder): the module against a float64 re-derivation written here
(explicit GroupNorm, softmax attention, nearest upsampling by repetition), tolerance 1e-5 relative; BFL's
key layout at the real config on the meta device; strict loading of a flux1-dev-ae file (encoder dropped)."""

import math

import pytest
import torch
import torch.nn.functional as F

from osx.errors import CheckpointError
from osx.export.checkpoint import save_safetensors
from osx.export.checkpoint_v2 import find_parts, identify, load_part
from osx.export.flux_ae import FluxAEDecoder
from osx.export.init import seeded_init_
from osx.models_v2 import FLUX1_AE, FLUX1_AE_TINY

CFG = FLUX1_AE_TINY
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def close(got, want, tol=TOL):
    got, want = got.double(), want.double()
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def conv(layer, x):
    w = layer.weight.double()
    return F.conv2d(x, w, layer.bias.double(), padding=w.shape[-1] // 2)


def gn(norm, x):
    B, C, H, W = x.shape
    g = x.reshape(B, 32, -1)
    g = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)
    return g.reshape(B, C, H, W) * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]


def silu(x):
    return x * torch.sigmoid(x)


def res(blk, x):
    h = conv(blk.conv2, silu(gn(blk.norm2, conv(blk.conv1, silu(gn(blk.norm1, x))))))
    return (conv(blk.nin_shortcut, x) if hasattr(blk, "nin_shortcut") else x) + h


def attn(blk, x):
    B, C, H, W = x.shape
    h = gn(blk.norm, x)
    q, k, v = (conv(p, h).reshape(B, C, H * W) for p in (blk.q, blk.k, blk.v))
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(C), dim=-1)  # [B, HW(query), HW(key)]
    return x + conv(blk.proj_out, (v @ w.transpose(1, 2)).reshape(B, C, H, W))


def ref_decode(m, z):
    d = m.decoder
    h = conv(d.conv_in, z.double() / 0.3611 + 0.1159)
    h = res(d.mid.block_2, attn(d.mid.attn_1, res(d.mid.block_1, h)))
    for i in reversed(range(len(d.up))):
        for blk in d.up[i].block:
            h = res(blk, h)
        if i:
            h = conv(d.up[i].upsample.conv, h.repeat_interleave(2, -2).repeat_interleave(2, -1))
    return conv(d.conv_out, silu(gn(d.norm_out, h)))


def test_decoder_against_rederivation():
    m = seeded_init_(FluxAEDecoder(CFG), seed=0).eval()
    z = torch.randn(2, 16, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = m(z)
    assert x.shape == (2, 3, 24, 40)  # three 2x upsamples (8x), as the real config
    close(x, ref_decode(m, z))


def test_real_config_bfl_keys_on_meta():
    with torch.device("meta"):
        m = FluxAEDecoder(FLUX1_AE)
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert all(k.startswith("decoder.") for k in got)
    assert got["decoder.conv_in.weight"] == [512, 16, 3, 3]
    assert got["decoder.mid.attn_1.q.weight"] == [512, 512, 1, 1]
    assert got["decoder.up.0.block.0.nin_shortcut.weight"] == [128, 256, 1, 1]
    assert got["decoder.up.3.upsample.conv.weight"] == [512, 512, 3, 3]
    assert got["decoder.conv_out.weight"] == [3, 128, 3, 3]
    assert not any(k.startswith("decoder.up.0.upsample") for k in got)
    assert [len(m.decoder.up[i].block) for i in range(4)] == [3, 3, 3, 3]
    # SD's AutoencoderKL decoder (49,490,199 with its 4->4 post_quant_conv) less that conv (20), plus conv_in's
    # 16 instead of 4 input channels (12 * 512 * 9 = 55,296): Flux's AE has no quant convs
    assert sum(p.numel() for p in m.parameters()) == 49_490_199 - 20 + 55_296 == 49_545_475


def test_ae_file_loaded_strictly_without_its_encoder(tmp_path):
    src = seeded_init_(FluxAEDecoder(CFG), seed=2)
    state = {**src.state_dict(), "encoder.down.0.block.0.conv1.weight": torch.zeros(32, 3, 3, 3),
             "encoder.conv_out.weight": torch.zeros(32, 64, 3, 3)}
    save_safetensors(state, tmp_path / "flux1-dev-ae.safetensors")
    assert identify(list(state)) == "flux_ae"
    assert find_parts(tmp_path) == {"flux_ae": tmp_path / "flux1-dev-ae.safetensors"}
    m = FluxAEDecoder(CFG)
    load_part(m, tmp_path / "flux1-dev-ae.safetensors", "flux_ae")
    for k, want in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], want), k
    del state["decoder.conv_out.bias"]
    save_safetensors(state, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match="decoder.conv_out.bias"):
        load_part(FluxAEDecoder(CFG), tmp_path / "broken.safetensors", "flux_ae")
