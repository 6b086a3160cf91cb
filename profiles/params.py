"""Parameter counts of each component, computed from the model config (no torch, no checkpoint).

Each count is split into `matrix` values (Linear / Conv weights: what INT8/FP8 quantization stores in
one byte) and `other` values (biases, norms, tables, embeddings: kept at 16 bits). The formulas follow
the module definitions in Open-Sora v1.2 (stdit3.py, vae.py, vae_temporal.py) and transformers'
T5EncoderModel; the test checks them against the parameter counts of the real checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from osx.models import ModelConfig, SpatialVAEConfig, TemporalVAEConfig


@dataclass(frozen=True)
class Params:
    matrix: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.matrix + self.other

    def __add__(self, o: "Params") -> "Params":
        return Params(self.matrix + o.matrix, self.other + o.other)

    def __mul__(self, k: int) -> "Params":
        return Params(self.matrix * k, self.other * k)


def linear(n_in: int, n_out: int, bias: bool = True) -> Params:
    return Params(n_in * n_out, n_out if bias else 0)


def conv(n_in: int, n_out: int, kernel: int, bias: bool = True) -> Params:
    """A conv with `kernel` taps (3x3 -> 9, 3x3x3 -> 27)."""
    return Params(n_in * n_out * kernel, n_out if bias else 0)


def norm(channels: int, bias: bool = True) -> Params:
    return Params(0, channels * (2 if bias else 1))


# --- T5 encoder -------------------------------------------------------------------------------------


def text_encoder_params(model: ModelConfig) -> Params:
    return t5_params(model.text_encoder)


def t5_params(te) -> Params:
    """A T5 encoder (transformers' T5EncoderModel) from its TextEncoderConfig."""
    inner = te.num_heads * te.d_kv
    ff_in = 2 if te.feed_forward_proj.startswith("gated") else 1
    layer = (
        linear(te.d_model, inner, bias=False) * 3 + linear(inner, te.d_model, bias=False)  # q, k, v, o
        + linear(te.d_model, te.d_ff, bias=False) * ff_in + linear(te.d_ff, te.d_model, bias=False)
        + norm(te.d_model, bias=False) * 2  # T5 RMS norms: weight only
    )
    embeddings = Params(0, te.vocab_size * te.d_model)
    relative_bias = Params(0, te.relative_attention_num_buckets * te.num_heads)  # first layer only
    return embeddings + layer * te.num_layers + relative_bias + norm(te.d_model, bias=False)


# --- STDiT3 -----------------------------------------------------------------------------------------


def denoiser_params(model: ModelConfig) -> Params:
    """STDiT3 parameters plus the learned null-text embedding `y_embedding` (a buffer, used for CFG)."""
    dn = model.denoiser
    C, hd, mlp = dn.hidden_size, dn.head_dim, int(dn.hidden_size * dn.mlp_ratio)
    patch = math.prod(dn.patch_size)
    timestep_mlp = linear(dn.frequency_embedding_size, C) + linear(C, C)
    block = (
        Params(0, 6 * C)  # scale_shift_table
        + linear(C, 3 * C) + Params(0, 2 * hd) + linear(C, C)  # self-attention: qkv, q/k RMSNorm, proj
        + linear(C, C) + linear(C, 2 * C) + linear(C, C)  # cross-attention: q, kv, proj
        + linear(C, mlp) + linear(mlp, C)
    )
    stdit = (
        conv(dn.in_channels, C, patch)  # x_embedder (Conv3d, kernel = patch)
        + timestep_mlp * 2  # t_embedder, fps_embedder
        + linear(C, 6 * C)  # t_block
        + linear(dn.caption_channels, C) + linear(C, C)  # y_embedder.y_proj
        + block * (2 * dn.depth)  # spatial + temporal blocks
        + Params(0, 2 * C) + linear(C, patch * dn.out_channels)  # final layer
        + Params(0, hd // 2)  # rope.freqs
    )
    return stdit + Params(0, dn.model_max_length * dn.caption_channels)  # y_embedding


# --- VAE --------------------------------------------------------------------------------------------


def _resnet2d(c_in: int, c_out: int, taps: int = 9) -> Params:
    p = norm(c_in) + conv(c_in, c_out, taps) + norm(c_out) + conv(c_out, c_out, taps)
    return p + (conv(c_in, c_out, 1) if c_in != c_out else Params())


def _mid_block2d(c: int, taps: int = 9) -> Params:
    attention = norm(c) + linear(c, c) * 4  # group_norm, to_q, to_k, to_v, to_out
    return _resnet2d(c, c, taps) * 2 + attention


def spatial_decoder_params(s: SpatialVAEConfig, taps: int = 9) -> Params:
    """diffusers AutoencoderKL: post_quant_conv + decoder. `taps` 27: the same layout with 3x3x3 convs
    (HunyuanVideo's causal VAE, profiles/params_v2.py)."""
    rev = tuple(reversed(s.block_out_channels))
    p = conv(s.latent_channels, s.latent_channels, 1) + conv(s.latent_channels, rev[0], taps) + _mid_block2d(rev[0], taps)
    prev = rev[0]
    for i, ch in enumerate(rev):
        for _ in range(s.layers_per_block + 1):
            p += _resnet2d(prev, ch, taps)
            prev = ch
        if i < len(rev) - 1:
            p += conv(ch, ch, taps)  # upsampler
    return p + norm(prev) + conv(prev, s.out_channels, taps)


def spatial_encoder_params(s: SpatialVAEConfig, taps: int = 9) -> Params:
    """diffusers AutoencoderKL: encoder + quant_conv (`taps` as for the decoder)."""
    boc = s.block_out_channels
    p = conv(s.in_channels, boc[0], taps)
    prev = boc[0]
    for i, ch in enumerate(boc):
        for _ in range(s.layers_per_block):
            p += _resnet2d(prev, ch, taps)
            prev = ch
        if i < len(boc) - 1:
            p += conv(ch, ch, taps)  # downsampler
    p += _mid_block2d(prev, taps) + norm(prev) + conv(prev, 2 * s.latent_channels, taps)
    return p + conv(2 * s.latent_channels, 2 * s.latent_channels, 1)


def _resnet3d(c_in: int, c_out: int) -> Params:
    """vae_temporal.ResBlock: causal 3x3x3 convs without bias, 1x1x1 shortcut when widths differ."""
    p = norm(c_in) + conv(c_in, c_out, 27, bias=False) + norm(c_out) + conv(c_out, c_out, 27, bias=False)
    return p + (conv(c_in, c_out, 1, bias=False) if c_in != c_out else Params())


def temporal_decoder_params(t: TemporalVAEConfig) -> Params:
    """vae_temporal.VAE_Temporal: post_quant_conv + Decoder."""
    widths = [t.filters * m for m in t.channel_multipliers]
    p = conv(t.embed_dim, t.latent_embed_dim, 1) + conv(t.latent_embed_dim, widths[-1], 27)
    p += _resnet3d(widths[-1], widths[-1]) * t.num_res_blocks
    prev = widths[-1]
    for i in reversed(range(len(widths))):
        for _ in range(t.num_res_blocks):
            p += _resnet3d(prev, widths[i])
            prev = widths[i]
        if i > 0 and t.temporal_downsample[i - 1]:
            p += conv(prev, prev * 2, 27)  # then depth-to-space in time
    return p + norm(prev) + conv(prev, t.in_out_channels, 27)


def temporal_encoder_params(t: TemporalVAEConfig) -> Params:
    """vae_temporal.VAE_Temporal: Encoder + quant_conv."""
    widths = [t.filters * m for m in t.channel_multipliers]
    p = conv(t.in_out_channels, t.filters, 27, bias=False)
    prev = t.filters
    for i, w in enumerate(widths):
        for _ in range(t.num_res_blocks):
            p += _resnet3d(prev, w)
            prev = w
        if i < len(widths) - 1 and t.temporal_downsample[i]:
            p += conv(prev, w, 27)  # strided in time
    p += _resnet3d(prev, widths[-1]) * t.num_res_blocks + norm(widths[-1])
    p += conv(widths[-1], 2 * t.latent_embed_dim, 1)
    return p + conv(2 * t.latent_embed_dim, 2 * t.embed_dim, 1)


def vae_decoder_params(model: ModelConfig) -> Params:
    return temporal_decoder_params(model.vae.temporal) + spatial_decoder_params(model.vae.spatial)


def vae_encoder_params(model: ModelConfig) -> Params:
    return spatial_encoder_params(model.vae.spatial) + temporal_encoder_params(model.vae.temporal)


COMPONENT_PARAMS = {
    "text_encoder": text_encoder_params,
    "denoiser": denoiser_params,
    "vae_decoder": vae_decoder_params,
    "vae_encoder": vae_encoder_params,
}


def component_params(model: ModelConfig, component: str) -> Params:
    return COMPONENT_PARAMS[component](model)
