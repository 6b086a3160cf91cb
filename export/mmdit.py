"""MMDiT, the Open-Sora v2.0 denoiser (Flux-style double + single stream transformer), in one file.

Same parameter names and maths as Open-Sora's `opensora/models/mmdit/{model,layers,math}.py` at the v2.0
config (`fused_qkv=False`, `use_liger_rope=True`, `cond_embed=True`), so `Open_Sora_v2.safetensors` loads
key for key; at Flux.1-dev's switches (`osx.models_v2.FLUX1_DEV`: guidance embedding, no `cond_in`, fused
qkv, interleaved RoPE) the same classes load BFL's `flux1-dev.safetensors`; rewritten without flash-attn, liger-kernel, einops or torch.compile so that it runs on a CPU
and traces to ONNX. Facts and traps: shared/design/opensora-v2.0.md, section 2.

Inputs are the packed sequences Open-Sora feeds (see `pack`): the noisy latent `img` [B, N, 64], T5 states
`txt` [B, L, 4096], timesteps t in [0, 1] [B], CLIP pooled `y_vec` [B, 768], the conditioning `cond`
[B, N, 68] (mask + reference latent, zeros for t2v; None for Flux), Flux's guidance scale [B] (None for
v2.0), and the RoPE tables `cos`, `sin` [1, L + N, 128] of
`rope_tables`. The tables are inputs (not recomputed from position ids inside) because they only depend on
the video's shape: the sampler builds them once per video, an export takes them from the host.

Numerics: the module runs in its parameters' dtype (bf16 as Open-Sora, or float32 as an oracle). Where
Open-Sora computes in float32 inside a bf16 model (RMSNorm statistics, RoPE, the timestep sinusoids) this
does too; the timestep and 1000*t are rounded to bf16 in every dtype, as Open-Sora's bf16 tensors are, unless
the model is built with `reference_dtype="fp32"` (osx.models_v2.SamplerV2Config.reference_dtype): then neither.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from osx.export.stdit3 import round_to_bf16
from osx.models_v2 import MMDiTConfig

# --- packing and positions ---------------------------------------------------------------------------


def pack(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T*(H/p)*(W/p), C*p*p]: tokens in (t, h, w) order, channels (c, ph, pw)."""
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T * (H // patch) * (W // patch), C * patch * patch)


def unpack(x: torch.Tensor, T: int, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of `pack`: [B, T*h*w, C*p*p] -> [B, C, T, h*p, w*p] (h, w in patches)."""
    B = x.shape[0]
    x = x.reshape(B, T, h, w, -1, patch, patch)
    return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(B, -1, T, h * patch, w * patch)


def position_ids(T: int, h: int, w: int) -> torch.Tensor:
    """[T*h*w, 3] float32 (t, h, w) index of every image token, in `pack`'s order."""
    t_i, h_i, w_i = torch.meshgrid(torch.arange(T), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([t_i, h_i, w_i], dim=-1).reshape(-1, 3).float()


def rope_tables(cfg: MMDiTConfig, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., N, head_dim] float32 for positions `ids` [..., N, 3].

    Per axis a (dims d_a = 16, 56, 56): angles pos_a * theta**(-2j/d_a), j < d_a/2; the three angle lists
    are concatenated ([t 8 | h 28 | w 28] = 64), then laid out for `apply_rope`: repeated twice for v2.0's
    rotate-half pairs (j, j + 64), each repeated in place for Flux's interleaved pairs (2j, 2j + 1).
    """
    angles = []
    for a, d in enumerate(cfg.axes_dim):
        omega = 1.0 / cfg.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles.append(ids[..., a : a + 1].float() * omega)
    angles = torch.cat(angles, dim=-1)
    angles = angles.repeat_interleave(2, dim=-1) if cfg.interleaved_rope else torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def video_rope(cfg: MMDiTConfig, txt_len: int, T: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables of one video, [1, txt_len + T*h*w, head_dim]: text tokens sit at position (0, 0, 0)."""
    ids = torch.cat([torch.zeros(txt_len, 3), position_ids(T, h, w)])
    cos, sin = rope_tables(cfg, ids)
    return cos[None], sin[None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on x [B, H, L, D] in float32: out = x*cos + rotated*sin, with the pairs (x1, x2) turned to
    (-x2, x1): x1/x2 the halves of D (rotate-half), or the even/odd dims (interleaved, Flux's layout)."""
    xf = x.float()
    if interleaved:
        pairs = xf.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, time_factor: float, max_period: float = 10000.0,
                       reference_dtype: str = "bf16") -> torch.Tensor:
    """[B] -> [B, dim] float32: [cos(1000t * f_k), sin(1000t * f_k)], f_k = max_period**(-k/(dim/2)).

    Open-Sora's t is a bf16 tensor and time_factor*t is computed in bf16: both are rounded here (reference
    dtype "bf16"); in "fp32" both stay float32.
    """
    rounded = round_to_bf16 if reference_dtype == "bf16" else (lambda x: x)
    t = rounded(time_factor * rounded(t.float()))
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# --- layers ------------------------------------------------------------------------------------------


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + 1e-6) in float32, cast back, then times `scale` (Liger's "llama" mode)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class Attention(nn.Module):
    """The projections of one stream of a double block (the attention itself is joint, in the block):
    q/k/v_proj, or one `qkv` Linear whose output is [q | k | v] (fused, BFL's names)."""

    def __init__(self, dim: int, num_heads: int, fused: bool):
        super().__init__()
        self.num_heads = num_heads
        if fused:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim)
            self.v_proj = nn.Linear(dim, dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def project(self, x):
        """-> q, k, v [B, H, L, D], q and k RMS-normalised per head."""
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return normed_heads(self.norm, q, k, v, self.num_heads)


class Modulation(nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.lin = nn.Linear(dim, n * dim)

    def forward(self, vec):
        """-> n tensors [B, 1, dim]: (shift, scale, gate) once or twice."""
        return self.lin(F.silu(vec))[:, None].chunk(self.n, dim=-1)


def heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, L, C = x.shape
    return x.reshape(B, L, num_heads, C // num_heads).transpose(1, 2)


def normed_heads(norm: QKNorm, q, k, v, num_heads: int):
    """[B, L, C] q, k, v -> [B, H, L, D] each, q and k RMS-normalised per head and cast to v's dtype."""
    q, k, v = (heads(x, num_heads) for x in (q, k, v))
    return norm.query_norm(q).to(v.dtype), norm.key_norm(k).to(v.dtype), v


def attention(q, k, v, cos, sin, interleaved: bool = False) -> torch.Tensor:
    """Unmasked joint attention with RoPE on q and k, softmax scale 1/sqrt(D); -> [B, L, H*D]."""
    q, k = apply_rope(q, cos, sin, interleaved), apply_rope(k, cos, sin, interleaved)
    out = F.scaled_dot_product_attention(q, k, v)
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def layer_norm(x):
    """LayerNorm without affine, eps 1e-6 (every norm of the blocks)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# --- blocks ------------------------------------------------------------------------------------------


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention over [txt; img]."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.interleaved = cfg.interleaved_rope
        self.img_mod = Modulation(C, 6)
        self.img_attn = Attention(C, cfg.num_heads, cfg.fused_qkv)
        self.img_mlp = mlp(C, cfg.mlp_hidden_dim)
        self.txt_mod = Modulation(C, 6)
        self.txt_attn = Attention(C, cfg.num_heads, cfg.fused_qkv)
        self.txt_mlp = mlp(C, cfg.mlp_hidden_dim)

    def forward(self, img, txt, vec, cos, sin):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.project((1 + img_scale1) * layer_norm(img) + img_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.project((1 + txt_scale1) * layer_norm(txt) + txt_shift1)
        q, k, v = (torch.cat(pair, 2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        out = attention(q, k, v, cos, sin, self.interleaved)
        L = txt.shape[1]
        txt_out, img_out = out[:, :L], out[:, L:]

        img = img + img_gate1 * self.img_attn.proj(img_out)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * layer_norm(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_out)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * layer_norm(txt) + txt_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt; img]: attention and MLP in parallel from one modulated input.

    Projections: q_proj, k_proj and v_mlp = [v | MLP input] (v2.0), or BFL's fused linear1 = [q | k | v | MLP
    input] (Flux.1-dev)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.num_heads, self.hidden_size, self.interleaved = cfg.num_heads, C, cfg.interleaved_rope
        if cfg.fused_qkv:
            self.linear1 = nn.Linear(C, 3 * C + cfg.mlp_hidden_dim)
        else:
            self.q_proj = nn.Linear(C, C)
            self.k_proj = nn.Linear(C, C)
            self.v_mlp = nn.Linear(C, C + cfg.mlp_hidden_dim)
        self.linear2 = nn.Linear(C + cfg.mlp_hidden_dim, C)  # attention out and MLP out, together
        self.norm = QKNorm(cfg.head_dim)
        self.modulation = Modulation(C, 3)

    def forward(self, x, vec, cos, sin):
        shift, scale, gate = self.modulation(vec)
        a = (1 + scale) * layer_norm(x) + shift
        C = self.hidden_size
        if hasattr(self, "linear1"):
            q, k, v, mlp_in = self.linear1(a).split([C, C, C, self.linear1.out_features - 3 * C], dim=-1)
        else:
            v, mlp_in = self.v_mlp(a).split([C, self.v_mlp.out_features - C], dim=-1)
            q, k = self.q_proj(a), self.k_proj(a)
        q, k, v = normed_heads(self.norm, q, k, v, self.num_heads)
        out = torch.cat([attention(q, k, v, cos, sin, self.interleaved), F.gelu(mlp_in, approximate="tanh")], dim=-1)
        return x + gate * self.linear2(out)


class LastLayer(nn.Module):
    def __init__(self, C: int, out: int):
        super().__init__()
        self.linear = nn.Linear(C, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)  # shift first
        return self.linear((1 + scale) * layer_norm(x) + shift)


# --- the model ---------------------------------------------------------------------------------------


class MMDiT(nn.Module):
    """`forward(img, txt, timesteps, y_vec, cond, cos, sin, guidance=None) -> velocity [B, N, in_channels]`
    (packed). `cond` is required exactly when the config has `cond_embed` (v2.0), `guidance` exactly when it
    has `guidance_embed` (Flux.1-dev), as in Open-Sora, which raises on a missing one. `reference_dtype`: what
    the timestep (and guidance) embedding rounds t and 1000*t to, "bf16" (Open-Sora) or "fp32" (no rounding)."""

    def __init__(self, cfg: MMDiTConfig, reference_dtype: str = "bf16"):
        super().__init__()
        if sum(cfg.axes_dim) != cfg.head_dim or any(d % 2 for d in cfg.axes_dim):
            raise ValueError(f"axes_dim {cfg.axes_dim} must be even and sum to head_dim {cfg.head_dim}")
        if reference_dtype not in ("bf16", "fp32"):
            raise ValueError(f"reference_dtype must be bf16 or fp32, got {reference_dtype!r}")
        self.cfg = cfg
        self.reference_dtype = reference_dtype
        C = cfg.hidden_size
        self.img_in = nn.Linear(cfg.in_channels, C)
        self.time_in = MLPEmbedder(cfg.timestep_dim, C)
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, C)
        if cfg.guidance_embed:
            self.guidance_in = MLPEmbedder(cfg.timestep_dim, C)
        if cfg.cond_embed:
            self.cond_in = nn.Linear(cfg.cond_channels, C)
        self.txt_in = nn.Linear(cfg.context_in_dim, C)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(C, cfg.in_channels)

    def forward(self, img, txt, timesteps, y_vec, cond, cos, sin, guidance=None):
        cfg, dtype = self.cfg, self.img_in.weight.dtype
        for name, value, wanted in (("cond", cond, cfg.cond_embed), ("guidance", guidance, cfg.guidance_embed)):
            if (value is None) == wanted:
                raise ValueError(f"this MMDiT {'needs' if wanted else 'takes no'} {name} input")
        img, txt, y_vec = (x.to(dtype) for x in (img, txt, y_vec))

        def embed(t):
            return timestep_embedding(t, cfg.timestep_dim, cfg.time_factor, reference_dtype=self.reference_dtype).to(dtype)

        vec = self.time_in(embed(timesteps))
        if cfg.guidance_embed:  # the guidance scale is embedded like a timestep (x1000), Open-Sora's order of sums
            vec = vec + self.guidance_in(embed(guidance))
        vec = vec + self.vector_in(y_vec)
        img = self.img_in(img)
        if cfg.cond_embed:
            img = img + self.cond_in(cond.to(dtype))
        txt = self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, cos, sin)
        x = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            x = block(x, vec, cos, sin)
        return self.final_layer(x[:, txt.shape[1] :], vec)
