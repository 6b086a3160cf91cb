"""STDiT3, the Open-Sora v1.2 denoiser, as one readable export-friendly file.

Same parameter names and maths as Open-Sora's `opensora/models/stdit/stdit3.py` (tag v1.2.0) so its
checkpoints load unchanged, rewritten so that torch.onnx.export traces it with dynamic batch, frames,
height and width: no `.item()`, no data-dependent Python branches, no flash-attn/xformers/apex/einops,
position embeddings and RoPE tables computed from tensor shapes and inputs inside `forward`.

The temporal mask `x_mask` [B, T] of image/video conditioning is an input: frames where it is 0 (the
conditioned, clean frames) are modulated with the timestep-0 embedding, as Open-Sora does. Open-Sora
modulates with both embeddings and selects the outputs per frame; selecting the modulation parameters
per frame instead is the same (modulation and gates are elementwise). Without x_mask (or all ones) it is
plain text-to-video. Shapes, formulas and parity traps are in shared/design/open-sora-models.md,
sections 1.2-1.3 and 1.5.

Differences from the reference that do not change results:
- text keys are padded to the fixed token count L and masked in the attention instead of packed with
  `masked_select` (a row whose mask is all zero attends uniformly instead of producing NaN);
- height, width and fps come per batch row (the reference reads row 0 of height/width);
- the model may run in float32 end to end; only the inputs the reference rounds to its dtype before
  use (timestep, fps, height, width) are rounded the same way here: `round_to_bf16` with the reference
  dtype bf16 (Open-Sora's default inference), none with fp32 (SchedulerConfig.reference_dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from osx.models import DenoiserConfig

# Exact powers of two 2**-133 (smallest bfloat16 subnormal step) .. 2**127, for `round_to_bf16`.
_POW2_MIN_EXP = -133
_POW2 = torch.tensor([2.0**e for e in range(_POW2_MIN_EXP, 128)], dtype=torch.float32)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest bfloat16 value (ties to even), returned as float32.

    The reference model builds timestep, fps, height and width as bfloat16 tensors, so e.g. a width of
    854 becomes 856 and timesteps in [512, 1024) snap to multiples of 4. This reproduces that rounding
    with float math only (no BFLOAT16 type in the exported graph, which TensorRT cannot build before
    compute capability 8.0): exponent from log2 (corrected exactly against a table of powers of two,
    since log2 may be off by one next to a power of two), then round(x / ulp) * ulp with ONNX Round's
    ties-to-even. Infinity and NaN pass through.
    """
    x = x.float()
    finite = x.abs() < math.inf  # not torch.isfinite: the TorchScript exporter routes it through float64
    a = torch.where(finite, x.abs(), torch.ones_like(x))
    pow2 = _POW2.to(x.device)
    exp = torch.floor(torch.log2(a)).clamp(-126, 127)  # log2(0) = -inf -> smallest normal exponent
    p = pow2[(exp - _POW2_MIN_EXP).long()]
    exp = exp - (p > a).float() + (2 * p <= a).float()
    ulp = pow2[(exp.clamp(-126, 127) - 7 - _POW2_MIN_EXP).long()]  # bfloat16 keeps 8 significant bits
    return torch.where(finite, torch.round(x / ulp) * ulp, x)


def sincos_embedding(v: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] -> [B, dim]: cos(v*f_k) then sin(v*f_k), f_k = max_period**(-k/(dim/2)) (GLIDE/DiT, cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=v.device) / half)
    args = v.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def pos_embed_2d(rows: int, cols: int, height: torch.Tensor, width: torch.Tensor, dim: int, input_sq_size: int) -> torch.Tensor:
    """2D sin-cos embedding of the rows x cols patch grid, [B, rows*cols, dim] in (row, col) order.

    As Open-Sora's PositionEmbedding2D: coordinates are scaled by 1/scale with scale =
    sqrt(height*width)/input_sq_size (pixels) and by base/rows (base/cols) with base = round(sqrt(rows*cols)).
    The COLUMN coordinate fills the first dim/2 channels (the reference's meshgrid puts w first); each
    half is [sin(p*w_k), cos(p*w_k)] with w_k = 10000**(-2k/(dim/2)).
    """
    device = height.device
    row = torch.arange(rows, dtype=torch.float32, device=device)
    col = torch.arange(cols, dtype=torch.float32, device=device)
    # the grid size as tensors (not Python ints) so an exported graph keeps it symbolic
    n_rows, n_cols = row.numel() * torch.ones((), device=device), col.numel() * torch.ones((), device=device)
    base = torch.round(torch.sqrt(n_rows * n_cols))
    scale = (torch.sqrt(height.float() * width.float()) / input_sq_size)[:, None]  # [B, 1]
    p_row = row[None] / scale * (base / n_rows)  # [B, rows]
    p_col = col[None] / scale * (base / n_cols)  # [B, cols]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim // 2, 2, dtype=torch.float32, device=device) / (dim // 2)))

    def sin_cos(p):  # [B, n] -> [B, n, dim/2]
        angle = p[..., None] * inv_freq
        return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)

    B = height.shape[0]
    emb_col = sin_cos(p_col)[:, None, :, :].expand(B, rows, cols, dim // 2)
    emb_row = sin_cos(p_row)[:, :, None, :].expand(B, rows, cols, dim // 2)
    return torch.cat([emb_col, emb_row], dim=-1).reshape(B, rows * cols, dim)


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Scalar -> sincos(256) -> Linear -> SiLU -> Linear (used for the timestep and for fps)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        freq = sincos_embedding(v, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class Mlp(nn.Module):
    """timm's Mlp (fc1 -> GELU(tanh) -> fc2), keeping its parameter names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the hidden size; holds the learned null caption used for guidance."""

    def __init__(self, in_channels: int, hidden_size: int, token_num: int):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.zeros(token_num, in_channels))  # in the checkpoint

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class PatchEmbed3D(nn.Module):
    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, T, H, W] (patch multiples) -> [B, N, hidden]
        return self.proj(x).flatten(2).transpose(1, 2)


class RMSNorm(nn.Module):
    """LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """rotary_embedding_torch's RotaryEmbedding(dim) as used by the temporal blocks ("lang" freqs).

    `freqs` is a non-trainable parameter there, so it is in the real state dict ("rope.freqs"); it is a
    constant of `dim` and `theta`, and checkpoints without it load (see checkpoint.load_into).
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin tables [seq_len, 1, dim] for `apply_rope` on [..., seq_len, heads, dim]: each
        frequency repeated for its interleaved pair (2k, 2k+1); sin negated at the even channel of each pair."""
        pos = torch.arange(seq_len, dtype=torch.float32, device=device)
        angle = pos[:, None] * self.freqs.float()[None]
        angle = torch.stack([angle, angle], dim=-1).flatten(-2)[:, None]
        sign = torch.arange(angle.shape[-1], device=device) % 2 * 2.0 - 1.0  # -1, 1, -1, ... (no tensor constant to trace)
        return torch.cos(angle), torch.sin(angle) * sign


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (a, b) -> (a cos - b sin, b cos + a sin), in float32, as x*cos + swap(x)*sin
    with swap (a, b) -> (b, a) and `sin` signed (-sin, +sin) per pair (RotaryEmbedding's tables): the same
    products and sums. Exported as one Gather and elementwise ops; a stack of rotated halves exports as
    Neg/Unsqueeze/Concat, which OpenVINO runs with its slow reference Concat (osx.export.ort_optimize gives
    onnxruntime its fastest form of the swap)."""
    h = x.float()
    swap = torch.arange(h.shape[-1], device=h.device).reshape(-1, 2).flip(-1).reshape(-1)  # 1, 0, 3, 2, ...
    return (h * cos + h.index_select(-1, swap) * sin).to(x.dtype)


class Attention(nn.Module):
    """Self-attention with QK RMSNorm and optional RoPE (temporal blocks)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        # [B, N, heads, head_dim] each: norm and RoPE in the layout the projection writes (no copy of qkv)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)  # norm first, then RoPE (qk_norm_legacy=False)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim**-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Video tokens attend to the text tokens; no norm, no modulation."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, N, C], y [B, L, C], key_bias [B, 1, 1, L] (0 for real tokens, large negative for padding)."""
        B, N, C = x.shape
        q = self.q_linear(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_linear(y).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class STDiT3Block(nn.Module):
    """One spatial (attention within a frame) or temporal (attention across frames) block."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, hidden_size))

    def forward(self, x, y, key_bias, t_mlp, T: int, S: int, rope=None):
        """t_mlp [B, T, 6C]: the modulation of each frame (t, or t=0 for conditioned frames)."""
        B, N, C = x.shape
        # [B, T, 1, C] each, broadcast over a frame's S tokens (never expanded to [B, N, C])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None, None] + t_mlp.reshape(B, T, 6, C)).unsqueeze(2).unbind(3)
        frames = lambda v: v.reshape(B, T, S, C)  # noqa: E731

        h = t2i_modulate(frames(self.norm1(x)), shift_msa, scale_msa)
        if self.temporal:  # [B, T, S, C] -> [B*S, T, C]
            h = self.attn(h.transpose(1, 2).reshape(B * S, T, C), rope)
            h = h.reshape(B, S, T, C).transpose(1, 2)
        else:  # [B*T, S, C]
            h = frames(self.attn(h.reshape(B * T, S, C)))
        x = x + (gate_msa * h).reshape(B, N, C)

        x = x + self.cross_attn(x, y, key_bias)

        h = t2i_modulate(frames(self.norm2(x)), shift_mlp, scale_mlp)
        return x + (gate_mlp * self.mlp(h)).reshape(B, N, C)


class FinalLayer(nn.Module):
    """PixArt's T2IFinalLayer: modulated LayerNorm (by t, not t_mlp) then a linear to patch values."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, hidden_size))

    def forward(self, x: torch.Tensor, t: torch.Tensor, T: int, S: int) -> torch.Tensor:
        """t [B, T, C]: each frame's t (or t0)."""
        B, N, C = x.shape
        shift, scale = (self.scale_shift_table[None, None] + t[:, :, None]).unsqueeze(2).unbind(3)  # [B, T, 1, C]
        h = t2i_modulate(self.norm_final(x).reshape(B, T, S, C), shift, scale).reshape(B, N, C)
        return self.linear(h)


class STDiT3(nn.Module):
    def __init__(self, cfg: DenoiserConfig, reference_dtype: str = "bf16"):
        super().__init__()
        self.cfg = cfg
        if reference_dtype not in ("bf16", "fp32"):
            raise ValueError(f"reference_dtype must be bf16 or fp32, got {reference_dtype!r}")
        self.reference_dtype = reference_dtype
        C = cfg.hidden_size
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C, cfg.frequency_embedding_size)
        self.fps_embedder = TimestepEmbedder(C, cfg.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, C, cfg.model_max_length)
        self.spatial_blocks = nn.ModuleList(
            STDiT3Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, temporal=False) for _ in range(cfg.depth)
        )
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, temporal=True) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(C, math.prod(cfg.patch_size), cfg.out_channels)

    def _to_reference(self, x: torch.Tensor) -> torch.Tensor:
        """A conditioning input as a tensor of the reference dtype holds it (in float32)."""
        return round_to_bf16(x) if self.reference_dtype == "bf16" else x.float()

    def null_text(self, batch: int) -> torch.Tensor:
        """The learned null caption for the unconditional half, [batch, L, caption_channels]."""
        return self.y_embedder.y_embedding[None].repeat(batch, 1, 1)

    def forward(self, x, timestep, y, mask, fps, height, width, x_mask=None) -> torch.Tensor:
        """
        x [B, in_channels, T, H, W] latent; timestep [B] in [0, 1000]; y [B, L, caption_channels] text
        features; mask [B, L] (1 = real token; the unconditional rows carry the conditional prompt's
        mask); fps, height, width [B] (height/width in pixels); x_mask [B, T] (1 = frame being generated,
        0 = conditioned frame, modulated as timestep 0; None = all ones). Returns [B, out_channels, T, H, W]
        float32.
        """
        dtype = self.x_embedder.proj.weight.dtype
        pt, ph, pw = self.cfg.patch_size
        B, _, Tx, Hx, Wx = x.shape
        # Pad T/H/W up to patch multiples at the end (e.g. 240p has 53 latent columns), crop back below.
        x = F.pad(x.to(dtype), (0, (-Wx) % pw, 0, (-Hx) % ph, 0, (-Tx) % pt))
        T, H, W = x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw
        S = H * W

        # Conditioning vector: the reference casts these to its dtype before embedding them.
        fps_emb = self.fps_embedder(self._to_reference(fps))
        t = self.t_embedder(self._to_reference(timestep)) + fps_emb
        if x_mask is None:
            x_mask = torch.ones(B, Tx, device=x.device)
        t0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
        # per frame: t where generating, t0 where conditioned (padded frames count as generating)
        keep = F.pad(x_mask.float(), (0, (-Tx) % pt), value=1.0)[:, ::pt, None] > 0.5  # [B, T, 1]
        t = torch.where(keep, t[:, None], t0[:, None])  # [B, T, C]
        t_mlp = self.t_block(t)  # [B, T, 6C]

        y = self.y_embedder(y.to(dtype))
        key_bias = ((mask.to(dtype) - 1) * 1e4)[:, None, None, :]  # 0 keeps a key, -1e4 drops it

        x = self.x_embedder(x)  # [B, T*S, C], (t, h, w) order
        pos = pos_embed_2d(H, W, self._to_reference(height), self._to_reference(width), self.cfg.hidden_size,
                           self.cfg.input_sq_size)
        x = (x.reshape(B, T, S, -1) + pos[:, None].to(dtype)).reshape(B, T * S, -1)

        rope = self.rope(T, x.device)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, y, key_bias, t_mlp, T, S)
            x = temporal(x, y, key_bias, t_mlp, T, S, rope)

        x = self.final_layer(x, t, T, S)  # [B, N, pt*ph*pw*C_out]
        return self.unpatchify(x, T, H, W)[:, :, :Tx, :Hx, :Wx].float()

    def unpatchify(self, x: torch.Tensor, T: int, H: int, W: int) -> torch.Tensor:
        """[B, T*H*W, (pt ph pw C_out)] -> [B, C_out, T*pt, H*ph, W*pw]; C_out varies fastest per token."""
        pt, ph, pw = self.cfg.patch_size
        B = x.shape[0]
        x = x.reshape(B, T, H, W, pt, ph, pw, self.cfg.out_channels)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, self.cfg.out_channels, T * pt, H * ph, W * pw)
