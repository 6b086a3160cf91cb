"""The Open-Sora v1.2 VAE: latent shapes, the chunk loop, causality, the real state dict, checkpoints,
and the exportable chunk modules. Tiny config, small frames, seeded weights."""

import math
import re

import numpy as np
import pytest
import torch

from osx.families import component_specs
from osx.errors import CheckpointError, InputError
from osx.models import OPENSORA_V1_2, OPENSORA_V1_2_TINY
from osx.export.vae import CausalConv3d, VideoAutoencoder

H, W = 16, 24  # pixels: a 2x3 latent grid, the smallest the tiny VAE needs to show its layout


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoAutoencoder(OPENSORA_V1_2_TINY.vae).eval()


def video(frames, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, H, W, generator=g) * 2 - 1


def expected_latent_frames(frames):
    # The notes' formula, written out here rather than imported (osx.models has its own copy).
    return 5 * (frames // 17) + math.ceil((frames % 17) / 4)


@pytest.mark.parametrize("frames", [1, 17, 51, 102])
@torch.no_grad()
def test_latent_shapes_and_round_trip(vae, frames):
    z = vae.encode(video(frames))
    assert z.shape == (1, 4, expected_latent_frames(frames), H // 8, W // 8)
    assert vae.decode(z, frames).shape == (1, 3, frames, H, W)


@torch.no_grad()
def test_chunked_decode_equals_chunks_decoded_by_hand(vae):
    frames = 40  # chunks of 17, 17 and 6 frames from 5, 5 and 2 latent frames
    z = torch.randn(2, 4, expected_latent_frames(frames), H // 8, W // 8, generator=torch.Generator().manual_seed(1))
    by_hand = []
    for latents, keep in ((z[:, :, 0:5], 17), (z[:, :, 5:10], 17), (z[:, :, 10:12], 6)):
        chunk = vae.decode_chunk(latents)
        assert chunk.shape == (2, 3, 4 * latents.shape[2], H, W)
        by_hand.append(chunk[:, :, chunk.shape[2] - keep :])  # the front padding goes
    # decode() runs the spatial VAE 4 frames at a time, by hand it ran on whole chunks: same numbers
    # up to float32 summation order.
    torch.testing.assert_close(vae.decode(z, frames), torch.cat(by_hand, dim=2), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_chunked_encode_equals_chunks_encoded_by_hand(vae):
    x = video(23, batch=2)
    by_hand = torch.cat([vae.encode_chunk(x[:, :, :17]), vae.encode_chunk(x[:, :, 17:])], dim=2)
    torch.testing.assert_close(vae.encode(x), by_hand, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_causal_conv_looks_back_only():
    # (The whole temporal VAE is not causal: its GroupNorms pool statistics over all frames of a chunk.)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 3, 3)
    x2 = x.clone()
    x2[:, :, 5] += 1.0
    conv = CausalConv3d(2, 2, 3)
    a, b = conv(x), conv(x2)
    assert a.shape == x.shape
    assert torch.equal(a[:, :, :5], b[:, :, :5]) and not torch.allclose(a[:, :, 5], b[:, :, 5])
    down = CausalConv3d(2, 2, 3, time_stride=2)  # output j sees input frames 2j-1 .. 2j+1
    a, b = down(x), down(x2)
    assert a.shape == (1, 2, 4, 3, 3)
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.allclose(a[:, :, 2:], b[:, :, 2:])


def test_decode_rejects_a_frame_count_that_does_not_match(vae):
    with pytest.raises(InputError, match="latent frames"):
        vae.decode(torch.zeros(1, 4, 5, 1, 1), num_frames=18)


# --- the real model's state dict, on the meta device (no memory, no weights) -----------------------

# shared/design/opensora-v1.2-state-dicts.md, "VAE v1.2": key pattern -> (shape of its first key, count).
# N stands for an index that follows a name (the doc keeps nested res-block indices literal).
REAL_VAE_KEYS = {
    "scale": ((1, 4, 1, 1, 1), 1),
    "shift": ((1, 4, 1, 1, 1), 1),
    "spatial_vae.module.encoder.conv_in.weight": ((128, 3, 3, 3), 1),
    "spatial_vae.module.encoder.conv_in.bias": ((128,), 1),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.norm1.weight": ((128,), 8),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.norm1.bias": ((128,), 8),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.conv1.weight": ((128, 128, 3, 3), 8),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.conv1.bias": ((128,), 8),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.norm2.weight": ((128,), 8),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.norm2.bias": ((128,), 8),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.conv2.weight": ((128, 128, 3, 3), 8),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.conv2.bias": ((128,), 8),
    "spatial_vae.module.encoder.down_blocks.N.downsamplers.N.conv.weight": ((128, 128, 3, 3), 3),
    "spatial_vae.module.encoder.down_blocks.N.downsamplers.N.conv.bias": ((128,), 3),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.conv_shortcut.weight": ((256, 128, 1, 1), 2),
    "spatial_vae.module.encoder.down_blocks.N.resnets.N.conv_shortcut.bias": ((256,), 2),
    "spatial_vae.module.encoder.mid_block.attentions.N.group_norm.weight": ((512,), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.group_norm.bias": ((512,), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_q.weight": ((512, 512), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_q.bias": ((512,), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_k.weight": ((512, 512), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_k.bias": ((512,), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_v.weight": ((512, 512), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_v.bias": ((512,), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_out.N.weight": ((512, 512), 1),
    "spatial_vae.module.encoder.mid_block.attentions.N.to_out.N.bias": ((512,), 1),
    "spatial_vae.module.encoder.mid_block.resnets.N.norm1.weight": ((512,), 2),
    "spatial_vae.module.encoder.mid_block.resnets.N.norm1.bias": ((512,), 2),
    "spatial_vae.module.encoder.mid_block.resnets.N.conv1.weight": ((512, 512, 3, 3), 2),
    "spatial_vae.module.encoder.mid_block.resnets.N.conv1.bias": ((512,), 2),
    "spatial_vae.module.encoder.mid_block.resnets.N.norm2.weight": ((512,), 2),
    "spatial_vae.module.encoder.mid_block.resnets.N.norm2.bias": ((512,), 2),
    "spatial_vae.module.encoder.mid_block.resnets.N.conv2.weight": ((512, 512, 3, 3), 2),
    "spatial_vae.module.encoder.mid_block.resnets.N.conv2.bias": ((512,), 2),
    "spatial_vae.module.encoder.conv_norm_out.weight": ((512,), 1),
    "spatial_vae.module.encoder.conv_norm_out.bias": ((512,), 1),
    "spatial_vae.module.encoder.conv_out.weight": ((8, 512, 3, 3), 1),
    "spatial_vae.module.encoder.conv_out.bias": ((8,), 1),
    "spatial_vae.module.decoder.conv_in.weight": ((512, 4, 3, 3), 1),
    "spatial_vae.module.decoder.conv_in.bias": ((512,), 1),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.norm1.weight": ((512,), 12),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.norm1.bias": ((512,), 12),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.conv1.weight": ((512, 512, 3, 3), 12),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.conv1.bias": ((512,), 12),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.norm2.weight": ((512,), 12),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.norm2.bias": ((512,), 12),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.conv2.weight": ((512, 512, 3, 3), 12),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.conv2.bias": ((512,), 12),
    "spatial_vae.module.decoder.up_blocks.N.upsamplers.N.conv.weight": ((512, 512, 3, 3), 3),
    "spatial_vae.module.decoder.up_blocks.N.upsamplers.N.conv.bias": ((512,), 3),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.conv_shortcut.weight": ((256, 512, 1, 1), 2),
    "spatial_vae.module.decoder.up_blocks.N.resnets.N.conv_shortcut.bias": ((256,), 2),
    "spatial_vae.module.decoder.mid_block.attentions.N.group_norm.weight": ((512,), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.group_norm.bias": ((512,), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_q.weight": ((512, 512), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_q.bias": ((512,), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_k.weight": ((512, 512), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_k.bias": ((512,), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_v.weight": ((512, 512), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_v.bias": ((512,), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_out.N.weight": ((512, 512), 1),
    "spatial_vae.module.decoder.mid_block.attentions.N.to_out.N.bias": ((512,), 1),
    "spatial_vae.module.decoder.mid_block.resnets.N.norm1.weight": ((512,), 2),
    "spatial_vae.module.decoder.mid_block.resnets.N.norm1.bias": ((512,), 2),
    "spatial_vae.module.decoder.mid_block.resnets.N.conv1.weight": ((512, 512, 3, 3), 2),
    "spatial_vae.module.decoder.mid_block.resnets.N.conv1.bias": ((512,), 2),
    "spatial_vae.module.decoder.mid_block.resnets.N.norm2.weight": ((512,), 2),
    "spatial_vae.module.decoder.mid_block.resnets.N.norm2.bias": ((512,), 2),
    "spatial_vae.module.decoder.mid_block.resnets.N.conv2.weight": ((512, 512, 3, 3), 2),
    "spatial_vae.module.decoder.mid_block.resnets.N.conv2.bias": ((512,), 2),
    "spatial_vae.module.decoder.conv_norm_out.weight": ((128,), 1),
    "spatial_vae.module.decoder.conv_norm_out.bias": ((128,), 1),
    "spatial_vae.module.decoder.conv_out.weight": ((3, 128, 3, 3), 1),
    "spatial_vae.module.decoder.conv_out.bias": ((3,), 1),
    "spatial_vae.module.quant_conv.weight": ((8, 8, 1, 1), 1),
    "spatial_vae.module.quant_conv.bias": ((8,), 1),
    "spatial_vae.module.post_quant_conv.weight": ((4, 4, 1, 1), 1),
    "spatial_vae.module.post_quant_conv.bias": ((4,), 1),
    "temporal_vae.encoder.conv_in.conv.weight": ((128, 4, 3, 3, 3), 1),
    "temporal_vae.encoder.block_res_blocks.N.0.norm1.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.0.norm1.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.0.conv1.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.0.norm2.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.0.norm2.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.0.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.1.norm1.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.1.norm1.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.1.conv1.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.1.norm2.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.1.norm2.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.1.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.2.norm1.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.2.norm1.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.2.conv1.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.2.norm2.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.2.norm2.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.2.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.3.norm1.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.3.norm1.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.3.conv1.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.3.norm2.weight": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.3.norm2.bias": ((128,), 4),
    "temporal_vae.encoder.block_res_blocks.N.3.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.encoder.block_res_blocks.N.0.conv3.conv.weight": ((256, 128, 1, 1, 1), 2),
    "temporal_vae.encoder.conv_blocks.N.conv.weight": ((256, 256, 3, 3, 3), 2),
    "temporal_vae.encoder.conv_blocks.N.conv.bias": ((256,), 2),
    "temporal_vae.encoder.res_blocks.N.norm1.weight": ((512,), 4),
    "temporal_vae.encoder.res_blocks.N.norm1.bias": ((512,), 4),
    "temporal_vae.encoder.res_blocks.N.conv1.conv.weight": ((512, 512, 3, 3, 3), 4),
    "temporal_vae.encoder.res_blocks.N.norm2.weight": ((512,), 4),
    "temporal_vae.encoder.res_blocks.N.norm2.bias": ((512,), 4),
    "temporal_vae.encoder.res_blocks.N.conv2.conv.weight": ((512, 512, 3, 3, 3), 4),
    "temporal_vae.encoder.norm1.weight": ((512,), 1),
    "temporal_vae.encoder.norm1.bias": ((512,), 1),
    "temporal_vae.encoder.conv2.conv.weight": ((8, 512, 1, 1, 1), 1),
    "temporal_vae.encoder.conv2.conv.bias": ((8,), 1),
    "temporal_vae.quant_conv.conv.weight": ((8, 8, 1, 1, 1), 1),
    "temporal_vae.quant_conv.conv.bias": ((8,), 1),
    "temporal_vae.post_quant_conv.conv.weight": ((4, 4, 1, 1, 1), 1),
    "temporal_vae.post_quant_conv.conv.bias": ((4,), 1),
    "temporal_vae.decoder.conv1.conv.weight": ((512, 4, 3, 3, 3), 1),
    "temporal_vae.decoder.conv1.conv.bias": ((512,), 1),
    "temporal_vae.decoder.res_blocks.N.norm1.weight": ((512,), 4),
    "temporal_vae.decoder.res_blocks.N.norm1.bias": ((512,), 4),
    "temporal_vae.decoder.res_blocks.N.conv1.conv.weight": ((512, 512, 3, 3, 3), 4),
    "temporal_vae.decoder.res_blocks.N.norm2.weight": ((512,), 4),
    "temporal_vae.decoder.res_blocks.N.norm2.bias": ((512,), 4),
    "temporal_vae.decoder.res_blocks.N.conv2.conv.weight": ((512, 512, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.0.norm1.weight": ((256,), 4),
    "temporal_vae.decoder.block_res_blocks.N.0.norm1.bias": ((256,), 4),
    "temporal_vae.decoder.block_res_blocks.N.0.conv1.conv.weight": ((128, 256, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.0.norm2.weight": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.0.norm2.bias": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.0.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.0.conv3.conv.weight": ((128, 256, 1, 1, 1), 2),
    "temporal_vae.decoder.block_res_blocks.N.1.norm1.weight": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.1.norm1.bias": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.1.conv1.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.1.norm2.weight": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.1.norm2.bias": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.1.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.2.norm1.weight": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.2.norm1.bias": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.2.conv1.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.2.norm2.weight": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.2.norm2.bias": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.2.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.3.norm1.weight": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.3.norm1.bias": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.3.conv1.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.decoder.block_res_blocks.N.3.norm2.weight": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.3.norm2.bias": ((128,), 4),
    "temporal_vae.decoder.block_res_blocks.N.3.conv2.conv.weight": ((128, 128, 3, 3, 3), 4),
    "temporal_vae.decoder.conv_blocks.N.conv.weight": ((512, 256, 3, 3, 3), 2),
    "temporal_vae.decoder.conv_blocks.N.conv.bias": ((512,), 2),
    "temporal_vae.decoder.norm1.weight": ((128,), 1),
    "temporal_vae.decoder.norm1.bias": ((128,), 1),
    "temporal_vae.decoder.conv_out.conv.weight": ((4, 128, 3, 3, 3), 1),
    "temporal_vae.decoder.conv_out.conv.bias": ((4,), 1),
}


def key_pattern(key):
    return re.sub(r"(?<=[A-Za-z_])\.\d+(?=\.)", ".N", key)


def test_real_vae_state_dict_matches_the_released_checkpoint_layout():
    with torch.device("meta"):
        vae = VideoAutoencoder(OPENSORA_V1_2.vae)
    sd = vae.state_dict()
    assert len(sd) == 517
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(vae), count(vae.spatial_vae), count(vae.temporal_vae)) == (393_341_007, 83_653_863, 309_687_144)
    assert [name for name, _ in vae.named_buffers()] == ["scale", "shift"]
    assert sum(t.numel() for t in sd.values()) == 393_341_015

    found = {}
    for key, tensor in sd.items():
        shape, n = found.get(key_pattern(key), (tuple(tensor.shape), 0))
        found[key_pattern(key)] = (shape, n + 1)
    assert found == REAL_VAE_KEYS


def test_latent_normalisation_buffers(vae):
    assert vae.scale.flatten().tolist() == pytest.approx([3.85, 2.32, 2.33, 3.06])
    assert vae.shift.flatten().tolist() == pytest.approx([-0.10, 0.34, 0.27, 0.98])


# --- checkpoints -----------------------------------------------------------------------------------


@torch.no_grad()
def test_safetensors_round_trip(vae, tmp_path):
    from osx.export.checkpoint import load_into, read_state_dict, save_safetensors

    path = tmp_path / "vae.safetensors"
    save_safetensors(vae.state_dict(), path)
    torch.manual_seed(123)
    other = VideoAutoencoder(OPENSORA_V1_2_TINY.vae).eval()
    z = torch.randn(1, 4, 2, H // 8, W // 8)
    assert not torch.allclose(other.decode_chunk(z), vae.decode_chunk(z))
    load_into(other, read_state_dict(path), source=str(path))
    assert torch.equal(other.decode_chunk(z), vae.decode_chunk(z))


def test_checkpoint_key_mismatch_is_a_clear_error(vae):
    from osx.export.checkpoint import load_into

    sd = dict(vae.state_dict())
    sd["temporal_vae.decoder.conv_out.conv.weight_renamed"] = sd.pop("temporal_vae.decoder.conv_out.conv.weight")
    target = VideoAutoencoder(OPENSORA_V1_2_TINY.vae)
    with pytest.raises(CheckpointError, match="temporal_vae.decoder.conv_out.conv.weight"):
        load_into(target, sd, source="broken.safetensors")


# --- ONNX: the chunk modules export with the spec's dynamic axes and match torch ---------------------


class _Chunk(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.slow
@pytest.mark.parametrize(
    "component, trace_shape, check_shapes",
    [
        ("vae_decoder", (1, 4, 5, 2, 3), [(2, 4, 3, 1, 2), (1, 4, 5, 2, 3)]),
        # frames % 4 == 0 needs no front padding: proves the pad is symbolic, not the traced 3 frames
        ("vae_encoder", (1, 3, 17, 16, 24), [(2, 3, 9, 16, 8), (1, 3, 8, 8, 16), (1, 3, 17, 16, 24)]),
    ],
)
def test_chunk_modules_export_to_onnx(vae, tmp_path, component, trace_shape, check_shapes):
    import onnxruntime as ort

    spec = component_specs(OPENSORA_V1_2_TINY)[component]
    module = _Chunk(vae.decode_chunk if component == "vae_decoder" else vae.encode_chunk).eval()
    path = tmp_path / f"{component}.onnx"
    torch.onnx.export(
        module, (torch.randn(trace_shape),), path, dynamo=True, opset_version=18,
        input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
        dynamic_axes=spec.dynamic_axes(),
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in check_shapes:
        x = torch.rand(shape) * 2 - 1
        with torch.no_grad():
            expected = module(x).numpy()
        (got,) = session.run(None, {spec.inputs[0].name: x.numpy()})
        assert got.shape == expected.shape
        # fp32 tolerance relative to the output's scale, as the export validation uses
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
