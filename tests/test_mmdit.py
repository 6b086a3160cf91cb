"""MMDiT (Open-Sora v2.0 denoiser): every part against a plain re-derivation written here, and the real
state-dict layout on the meta device. Re-derivations run in float64 from the module's own parameters;
the module runs in float32; tolerance 1e-5 (relative to the output's scale)."""

import math

import numpy as np
import pytest
import torch

from osx.export.init import seeded_init_
from osx.export.mmdit import (
    MMDiT, apply_rope, attention, pack, position_ids, rope_tables, timestep_embedding, unpack, video_rope,
)
from osx.models_v2 import OPENSORA_V2_0, OPENSORA_V2_0_TINY

CFG = OPENSORA_V2_0_TINY.mmdit
TOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return seeded_init_(MMDiT(CFG), seed=0).eval()


def close(got, want, tol=TOL):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()


# --- re-derivations (float64, explicit formulas) -------------------------------------------------------


def ref_angles(ids: torch.Tensor) -> torch.Tensor:
    """[N, head_dim/2] angle of each rotated pair (j, j + D/2): axis a's frequencies theta**(-2m/d_a)."""
    cols = []
    for a, d in enumerate(CFG.axes_dim):
        for m in range(d // 2):
            cols.append(ids[:, a].double() * CFG.theta ** (-2.0 * m / d))
    return torch.stack(cols, dim=-1)


def ref_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Complex-exponential rotation: z_j = x_j + i*x_{j+D/2} times exp(i*angle_j)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.exp(1j * angles.double())
    return torch.cat([z.real, z.imag], dim=-1)


def ref_attention(q, k, v, angles):
    q, k = ref_rope(q, angles), ref_rope(k, angles)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    w = torch.exp(scores - scores.max(-1, keepdim=True).values)
    out = (w / w.sum(-1, keepdim=True)) @ v.double()
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


def lin(layer, x):
    return x @ layer.weight.double().T + layer.bias.double()


def ln(x):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-6)


def rms(norm, x):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.scale.double()


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + torch.exp(-x))


def split_heads(x):
    B, L, C = x.shape
    return x.reshape(B, L, CFG.num_heads, C // CFG.num_heads).transpose(1, 2)


def ref_double(blk, img, txt, vec, angles):
    mi = lin(blk.img_mod.lin, silu(vec))[:, None].chunk(6, -1)
    mt = lin(blk.txt_mod.lin, silu(vec))[:, None].chunk(6, -1)
    a_i, a_t = (1 + mi[1]) * ln(img) + mi[0], (1 + mt[1]) * ln(txt) + mt[0]

    def qkv(attn, a):
        q, k, v = (split_heads(lin(p, a)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        return rms(attn.norm.query_norm, q), rms(attn.norm.key_norm, k), v

    qi, ki, vi = qkv(blk.img_attn, a_i)
    qt, kt, vt = qkv(blk.txt_attn, a_t)
    out = ref_attention(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), angles)
    L = txt.shape[1]
    img = img + mi[2] * lin(blk.img_attn.proj, out[:, L:])
    img = img + mi[5] * lin(blk.img_mlp[2], gelu_tanh(lin(blk.img_mlp[0], (1 + mi[4]) * ln(img) + mi[3])))
    txt = txt + mt[2] * lin(blk.txt_attn.proj, out[:, :L])
    txt = txt + mt[5] * lin(blk.txt_mlp[2], gelu_tanh(lin(blk.txt_mlp[0], (1 + mt[4]) * ln(txt) + mt[3])))
    return img, txt


def ref_single(blk, x, vec, angles):
    shift, scale, gate = lin(blk.modulation.lin, silu(vec))[:, None].chunk(3, -1)
    a = (1 + scale) * ln(x) + shift
    C = CFG.hidden_size
    vm = lin(blk.v_mlp, a)
    q = rms(blk.norm.query_norm, split_heads(lin(blk.q_proj, a)))
    k = rms(blk.norm.key_norm, split_heads(lin(blk.k_proj, a)))
    out = torch.cat([ref_attention(q, k, split_heads(vm[..., :C]), angles), gelu_tanh(vm[..., C:])], -1)
    return x + gate * lin(blk.linear2, out)


def ref_timestep(t: float, reference_dtype: str = "bf16") -> torch.Tensor:
    """Open-Sora's t and 1000*t are bf16 tensors (rounded here alike; reference dtype fp32: float32 t, exact
    product); the sinusoids in float64."""
    f32 = torch.tensor(t, dtype=torch.float32).item()
    tt = bf16(CFG.time_factor * bf16(t)) if reference_dtype == "bf16" else CFG.time_factor * f32
    half = CFG.timestep_dim // 2
    args = [tt * math.exp(-math.log(10000) * k / half) for k in range(half)]
    return torch.tensor([math.cos(a) for a in args] + [math.sin(a) for a in args], dtype=torch.float64)


# The embedding's float32 arguments reach 1000 rad, where one float32 step is 6.1e-5: the module (as
# Open-Sora's float32 code) cannot be closer than that to float64, so its tests allow 2 steps.
TIME_TOL = 1.2e-4


def ref_forward(m, img, txt, t, y, cond, ids):
    angles = ref_angles(ids)
    temb = torch.stack([ref_timestep(v) for v in t.tolist()])
    vec = lin(m.time_in.out_layer, silu(lin(m.time_in.in_layer, temb)))
    vec = vec + lin(m.vector_in.out_layer, silu(lin(m.vector_in.in_layer, y.double())))
    x_img = lin(m.img_in, img.double()) + lin(m.cond_in, cond.double())
    x_txt = lin(m.txt_in, txt.double())
    for blk in m.double_blocks:
        x_img, x_txt = ref_double(blk, x_img, x_txt, vec, angles)
    x = torch.cat([x_txt, x_img], 1)
    for blk in m.single_blocks:
        x = ref_single(blk, x, vec, angles)
    shift, scale = lin(m.final_layer.adaLN_modulation[1], silu(vec))[:, None].chunk(2, -1)
    return lin(m.final_layer.linear, (1 + scale) * ln(x[:, txt.shape[1]:]) + shift)


def inputs(B=2, T=2, h=3, w=4, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = T * h * w
    return dict(
        img=torch.randn(B, N, CFG.in_channels, generator=g),
        txt=torch.randn(B, L, CFG.context_in_dim, generator=g),
        timesteps=torch.tensor([0.9964526, 0.33266][:B]),
        y_vec=torch.randn(B, CFG.vec_in_dim, generator=g),
        cond=torch.randn(B, N, CFG.cond_channels, generator=g),
    ), (T, h, w, L)


# --- parts ---------------------------------------------------------------------------------------------


def test_pack_order_and_inverse():
    x = torch.randn(2, 16, 3, 6, 8)
    p = pack(x)
    assert p.shape == (2, 3 * 3 * 4, 64)
    for b, c, t, i, j, ph, pw in [(0, 0, 0, 0, 0, 0, 0), (1, 5, 2, 1, 3, 1, 0), (0, 15, 1, 2, 2, 0, 1), (1, 7, 2, 2, 3, 1, 1)]:
        # token (t, i, j) in row-major order; channel (c, ph, pw) with pw fastest
        assert p[b, (t * 3 + i) * 4 + j, c * 4 + ph * 2 + pw] == x[b, c, t, 2 * i + ph, 2 * j + pw]
    assert torch.equal(unpack(p, 3, 3, 4), x)


def test_position_ids_follow_pack_order():
    ids = position_ids(2, 3, 4)
    assert ids.shape == (24, 3) and ids.dtype == torch.float32
    assert ids[(1 * 3 + 2) * 4 + 3].tolist() == [1, 2, 3]


def test_timestep_embedding_rounds_like_bf16():
    t = torch.tensor([1.0, 0.9964526295661926, 0.33266, 0.10473822])
    got = timestep_embedding(t, CFG.timestep_dim, CFG.time_factor)
    close(got, torch.stack([ref_timestep(v) for v in t.tolist()]), tol=TIME_TOL)
    # 1000 * bf16(0.99645) = 996.09..., rounded to bf16: 996 (the values the doc lists: 1000, 996, 992, ...)
    assert bf16(1000 * bf16(0.9964526)) == 996.0


def test_timestep_embedding_at_reference_dtype_fp32_rounds_nothing():
    """SamplerV2Config.reference_dtype "fp32": t and 1000*t stay float32 (996.45..., not 996), in the module too."""
    t = torch.tensor([1.0, 0.9964526295661926, 0.33266, 0.10473822])
    got = timestep_embedding(t, CFG.timestep_dim, CFG.time_factor, reference_dtype="fp32")
    close(got, torch.stack([ref_timestep(v, "fp32") for v in t.tolist()]), tol=TIME_TOL)
    assert (got - timestep_embedding(t, CFG.timestep_dim, CFG.time_factor)).abs().max() > 1e-2  # 0.45 rad apart at k=0
    m16, m32 = seeded_init_(MMDiT(CFG), seed=0).eval(), seeded_init_(MMDiT(CFG, "fp32"), seed=0).eval()  # float32 weights
    kw, (T, h, w, L) = inputs(B=1)
    cos, sin = video_rope(CFG, L, T, h, w)
    with torch.no_grad():
        a, b = (m(**kw, cos=cos, sin=sin) for m in (m16, m32))
    assert (a - b).abs().max() > 1e-4 * a.abs().max()
    with pytest.raises(ValueError, match="bf16 or fp32"):
        MMDiT(CFG, "fp16")


def test_rope_is_complex_rotation():
    ids = torch.cat([torch.zeros(3, 3), position_ids(2, 3, 4)])
    cos, sin = rope_tables(CFG, ids)
    x = torch.randn(2, CFG.num_heads, ids.shape[0], CFG.head_dim)
    close(apply_rope(x, cos[None], sin[None]), ref_rope(x, ref_angles(ids)))
    # text tokens sit at (0, 0, 0): identity rotation
    assert torch.equal(apply_rope(x, cos[None], sin[None])[:, :, :3], x[:, :, :3])


def test_rope_is_not_the_interleaved_layout():
    ids = position_ids(1, 2, 3)
    cos, sin = rope_tables(CFG, ids)
    x = torch.randn(1, 1, ids.shape[0], CFG.head_dim)
    inter = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.exp(1j * ref_angles(ids))
    interleaved = torch.stack([inter.real, inter.imag], -1).flatten(-2)
    assert (apply_rope(x, cos[None], sin[None]).double() - interleaved).abs().max() > 1e-2


def test_attention_is_explicit_softmax():
    q, k, v = (torch.randn(2, CFG.num_heads, 7, CFG.head_dim) for _ in range(3))
    ids = torch.cat([torch.zeros(1, 3), position_ids(1, 2, 3)])
    cos, sin = rope_tables(CFG, ids)
    close(attention(q, k, v, cos[None], sin[None]), ref_attention(q, k, v, ref_angles(ids)))


def test_double_block(model):
    (kw, (T, h, w, L)) = inputs()
    cos, sin = video_rope(CFG, L, T, h, w)
    img, txt = torch.randn(2, T * h * w, CFG.hidden_size), torch.randn(2, L, CFG.hidden_size)
    vec = torch.randn(2, CFG.hidden_size)
    angles = ref_angles(torch.cat([torch.zeros(L, 3), position_ids(T, h, w)]))
    with torch.no_grad():
        got = model.double_blocks[0](img, txt, vec, cos, sin)
    want = ref_double(model.double_blocks[0], img.double(), txt.double(), vec.double(), angles)
    close(got[0], want[0])
    close(got[1], want[1])


def test_single_block(model):
    (_, (T, h, w, L)) = inputs()
    cos, sin = video_rope(CFG, L, T, h, w)
    x, vec = torch.randn(2, L + T * h * w, CFG.hidden_size), torch.randn(2, CFG.hidden_size)
    angles = ref_angles(torch.cat([torch.zeros(L, 3), position_ids(T, h, w)]))
    with torch.no_grad():
        got = model.single_blocks[1](x, vec, cos, sin)
    close(got, ref_single(model.single_blocks[1], x.double(), vec.double(), angles))


def test_whole_forward(model):
    kw, (T, h, w, L) = inputs()
    cos, sin = video_rope(CFG, L, T, h, w)
    with torch.no_grad():
        got = model(**kw, cos=cos, sin=sin)
    assert got.shape == kw["img"].shape
    ids = torch.cat([torch.zeros(L, 3), position_ids(T, h, w)])
    close(got, ref_forward(model, kw["img"], kw["txt"], kw["timesteps"], kw["y_vec"], kw["cond"], ids))


def test_every_input_moves_the_output(model):
    kw, (T, h, w, L) = inputs(B=1)
    cos, sin = video_rope(CFG, L, T, h, w)
    with torch.no_grad():
        base = model(**kw, cos=cos, sin=sin)
        for name in ("txt", "y_vec", "cond", "timesteps"):
            changed = dict(kw, **{name: kw[name] * 0.5})
            delta = (model(**changed, cos=cos, sin=sin) - base).abs().mean() / base.abs().mean()
            assert delta > 1e-2, f"{name} barely matters ({delta:.1e}): weights too weak to test conditioning"


def test_bf16_model_tracks_float32(model):
    kw, (T, h, w, L) = inputs()
    cos, sin = video_rope(CFG, L, T, h, w)
    m16 = seeded_init_(MMDiT(CFG), seed=0).eval().to(torch.bfloat16)
    with torch.no_grad():
        a, b = model(**kw, cos=cos, sin=sin), m16(**kw, cos=cos, sin=sin)
    assert b.dtype == torch.bfloat16
    close(b.float(), a, tol=5e-2)  # bf16 keeps 8 significant bits; 4 blocks of rounding


# --- the real config, on the meta device ---------------------------------------------------------------

# Copied from shared/design/opensora-v2.0.md section 2.8 (derived from Open-Sora's module constructors).
REAL_TOP = {
    "img_in.weight": [3072, 64], "img_in.bias": [3072],
    "time_in.in_layer.weight": [3072, 256], "time_in.in_layer.bias": [3072],
    "time_in.out_layer.weight": [3072, 3072], "time_in.out_layer.bias": [3072],
    "vector_in.in_layer.weight": [3072, 768], "vector_in.in_layer.bias": [3072],
    "vector_in.out_layer.weight": [3072, 3072], "vector_in.out_layer.bias": [3072],
    "cond_in.weight": [3072, 68], "cond_in.bias": [3072],
    "txt_in.weight": [3072, 4096], "txt_in.bias": [3072],
    "final_layer.linear.weight": [64, 3072], "final_layer.linear.bias": [64],
    "final_layer.adaLN_modulation.1.weight": [6144, 3072], "final_layer.adaLN_modulation.1.bias": [6144],
}
REAL_DOUBLE = {
    **{f"{s}_mod.lin.weight": [18432, 3072] for s in ("img", "txt")},
    **{f"{s}_mod.lin.bias": [18432] for s in ("img", "txt")},
    **{f"{s}_attn.{p}.weight": [3072, 3072] for s in ("img", "txt") for p in ("q_proj", "k_proj", "v_proj", "proj")},
    **{f"{s}_attn.{p}.bias": [3072] for s in ("img", "txt") for p in ("q_proj", "k_proj", "v_proj", "proj")},
    **{f"{s}_attn.norm.{n}.scale": [128] for s in ("img", "txt") for n in ("query_norm", "key_norm")},
    **{f"{s}_mlp.0.weight": [12288, 3072] for s in ("img", "txt")},
    **{f"{s}_mlp.0.bias": [12288] for s in ("img", "txt")},
    **{f"{s}_mlp.2.weight": [3072, 12288] for s in ("img", "txt")},
    **{f"{s}_mlp.2.bias": [3072] for s in ("img", "txt")},
}
REAL_SINGLE = {
    "q_proj.weight": [3072, 3072], "q_proj.bias": [3072], "k_proj.weight": [3072, 3072], "k_proj.bias": [3072],
    "v_mlp.weight": [15360, 3072], "v_mlp.bias": [15360], "linear2.weight": [3072, 15360], "linear2.bias": [3072],
    "norm.query_norm.scale": [128], "norm.key_norm.scale": [128],
    "modulation.lin.weight": [9216, 3072], "modulation.lin.bias": [9216],
}


def test_real_config_keys_shapes_and_counts():
    with torch.device("meta"):
        m = MMDiT(OPENSORA_V2_0.mmdit)
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    want = dict(REAL_TOP)
    want.update({f"double_blocks.{n}.{k}": s for n in range(19) for k, s in REAL_DOUBLE.items()})
    want.update({f"single_blocks.{n}.{k}": s for n in range(38) for k, s in REAL_SINGLE.items()})
    assert got == want
    assert len(got) == 1082
    assert sum(np.prod(s) for s in got.values()) == 11_891_390_528
    assert sum(p.numel() for p in m.parameters()) == 11_891_390_528
