"""Open-Sora v2.0's forward adapters: each component's torch module called with the I/O its family declares
(osx/families/opensora_v2_0.py), which is what the ONNX graph traces and validation runs.

    text_encoder  input_ids -> T5 states; Open-Sora passes no attention mask, so every position is attended
    clip          input_ids -> pooled (the module's own forward)
    denoiser      img, txt, timestep, y_vec, cond, rope_cos, rope_sin -> v: the image tokens' RoPE tables
                  get the text tokens' rows prepended (position (0, 0, 0): cos 1, sin 0), then MMDiT.forward
    vae_decoder   one tile of normalised latents -> pixels (HunyuanVideoVAE.decode_tile)
    vae_encoder   one tile of pixels -> the posterior mean, normalised as the MMDiT sees latents
    t2i_denoiser  (t2i2v) Flux.1-dev: img, txt, timestep, y_vec, guidance, rope_cos, rope_sin -> v, the denoiser's
                  packing with the guidance scale instead of cond (its tables in the interleaved layout)
    t2i_decoder   (t2i2v) Flux's AE decoder: z -> pixels (its own forward, z / 0.3611 + 0.1159 inside)
"""

from __future__ import annotations

from typing import Callable

import torch


def forward_adapter(component: str, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    if component == "text_encoder":
        return lambda input_ids: module(input_ids, torch.ones_like(input_ids))
    if component == "denoiser":
        return lambda *inputs: denoise_packed(module, *inputs)
    if component == "vae_decoder":
        return module.decode_tile
    if component == "vae_encoder":
        return lambda video: encode_mean(module, video)
    if component == "t2i_denoiser":
        return lambda img, txt, t, y_vec, guidance, rope_cos, rope_sin: denoise_packed(
            module, img, txt, t, y_vec, None, rope_cos, rope_sin, guidance=guidance)
    return module


def denoise_packed(mmdit, img, txt, timestep, y_vec, cond, rope_cos, rope_sin, guidance=None):
    """MMDiT.forward with the image tokens' RoPE tables [tokens, head_dim] extended over the text tokens."""
    L, D = txt.shape[1], rope_cos.shape[-1]
    cos = torch.cat([rope_cos.new_ones(L, D), rope_cos])[None]
    sin = torch.cat([rope_sin.new_zeros(L, D), rope_sin])[None]
    return mmdit(img, txt, timestep, y_vec, cond, cos, sin, guidance=guidance)


def encode_mean(vae, video):
    """scale_factor * (posterior mean - shift_factor): HunyuanVideoVAE.encode without sampling, per tile."""
    mean = vae.encode_moments(video)[:, : vae.cfg.latent_channels]
    return vae.cfg.scale_factor * (mean - vae.cfg.shift_factor)
