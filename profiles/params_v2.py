"""Parameter counts of Open-Sora v2.0's components from its config (no torch, no checkpoint).

Same split as profiles/params.py (`matrix`: Linear / Conv weights, what FP8/INT8 stores in one byte;
`other`: biases, norms, embeddings, kept at 16 bits). Modules: export/mmdit.py, export/t5.py (T5 v1.1-XXL
encoder), export/clip.py, export/hunyuan_vae.py; shared/design/opensora-v2.0.md gives the released totals.
"""

from __future__ import annotations

from types import SimpleNamespace

from osx.models_v2 import T2I_CONFIGS, CLIPTextConfig, FluxAEConfig, HunyuanVAEConfig, MMDiTConfig, OpenSoraV2Config
from osx.profiles.params import Params, conv, linear, norm, spatial_decoder_params, spatial_encoder_params, t5_params


def mmdit_params(m: MMDiTConfig) -> Params:
    C, mlp, hd = m.hidden_size, m.mlp_hidden_dim, m.head_dim
    qk_norm = Params(0, 2 * hd)
    stream = linear(C, 6 * C) + linear(C, C) * 4 + qk_norm + linear(C, mlp) + linear(mlp, C)  # mod, q k v proj, mlp
    single = linear(C, C) * 2 + linear(C, C + mlp) + linear(C + mlp, C) + qk_norm + linear(C, 3 * C)
    embedder = linear(m.timestep_dim, C) + linear(C, C)  # time_in, and guidance_in (Flux.1-dev)
    top = (linear(m.in_channels, C) + embedder + linear(m.vec_in_dim, C) + linear(C, C) + linear(m.context_in_dim, C)
           + linear(C, m.in_channels) + linear(C, 2 * C))
    top = top + (linear(m.cond_channels, C) if m.cond_embed else Params()) + (embedder if m.guidance_embed else Params())
    return top + stream * (2 * m.depth) + single * m.depth_single_blocks


def clip_params(c: CLIPTextConfig) -> Params:
    d, ff = c.hidden_size, c.intermediate_size
    layer = norm(d) * 2 + linear(d, d) * 4 + linear(d, ff) + linear(ff, d)
    return Params(0, (c.vocab_size + c.max_position_embeddings) * d) + layer * c.num_hidden_layers + norm(d)


def hunyuan_decoder_params(v: HunyuanVAEConfig) -> Params:
    """post_quant_conv + decoder: AutoencoderKL's layout with causal 3x3x3 convs (all with bias)."""
    return spatial_decoder_params(v, taps=27)


def hunyuan_encoder_params(v: HunyuanVAEConfig) -> Params:
    """encoder + quant_conv."""
    return spatial_encoder_params(v, taps=27)


def flux_ae_decoder_params(a: FluxAEConfig) -> Params:
    """BFL's AE decoder (export/flux_ae.py): AutoencoderKL's decoder layout, without post_quant_conv."""
    layout = SimpleNamespace(latent_channels=a.z_channels, block_out_channels=tuple(a.ch * m for m in a.ch_mult),
                             layers_per_block=a.num_res_blocks, out_channels=a.out_ch)
    with_quant, quant = spatial_decoder_params(layout), conv(a.z_channels, a.z_channels, 1)
    return Params(with_quant.matrix - quant.matrix, with_quant.other - quant.other)


def component_params_v2(cfg: OpenSoraV2Config, component: str) -> Params:
    """`t2i_denoiser` (Flux.1-dev) and `t2i_decoder` (its AE decoder): t2i2v's image step, T2I_CONFIGS."""
    return {
        "text_encoder": lambda: t5_params(cfg.t5),
        "clip": lambda: clip_params(cfg.clip),
        "denoiser": lambda: mmdit_params(cfg.mmdit),
        "vae_decoder": lambda: hunyuan_decoder_params(cfg.vae),
        "vae_encoder": lambda: hunyuan_encoder_params(cfg.vae),
        "t2i_denoiser": lambda: mmdit_params(T2I_CONFIGS[cfg.name].mmdit),
        "t2i_decoder": lambda: flux_ae_decoder_params(T2I_CONFIGS[cfg.name].ae),
    }[component]()
