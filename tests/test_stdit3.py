"""STDiT3 reference module: shapes, the real state-dict layout, the parity traps, ONNX export."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from osx.families import component_specs
from osx.models import OPENSORA_V1_2, OPENSORA_V1_2_TINY
from osx.export.init import seeded_init_
from osx.export.stdit3 import STDiT3, apply_rope, pos_embed_2d, round_to_bf16

CFG = OPENSORA_V1_2_TINY.denoiser
L = CFG.model_max_length


@pytest.fixture(scope="module")
def model():
    return seeded_init_(STDiT3(CFG), seed=0).eval()


def inputs(B=2, T=3, H=6, W=7, seed=0, timestep=(900.0, 400.0), height=None, width=None, lengths=None):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [L // 2] * B
    return dict(
        x=torch.randn(B, CFG.in_channels, T, H, W, generator=g),
        timestep=torch.tensor(timestep[:B], dtype=torch.float32),
        y=torch.randn(B, L, CFG.caption_channels, generator=g),
        mask=(torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long(),
        fps=torch.full((B,), 24.0),
        height=torch.full((B,), float(height or 8 * H)),
        width=torch.full((B,), float(width or 8 * W)),
    )


def run(model, **kw):
    with torch.no_grad():
        return model(**inputs(**kw))


# --- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,T,H,W", [(1, 1, 8, 8), (2, 3, 6, 7), (2, 5, 4, 13), (1, 10, 7, 5)])
def test_forward_shapes(model, B, T, H, W):
    # odd H/W (e.g. 240p's 53 latent columns) are padded to even inside and cropped back
    out = run(model, B=B, T=T, H=H, W=W)
    assert out.shape == (B, CFG.out_channels, T, H, W) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3  # seeded weights give a live signal


def test_batch_rows_are_independent(model):
    kw = inputs(B=2)
    with torch.no_grad():
        both = model(**kw)
        first = model(**{k: v[:1] for k, v in kw.items()})
    torch.testing.assert_close(both[:1], first, rtol=1e-5, atol=1e-5)


def test_null_text_is_the_learned_buffer(model):
    y_null = model.null_text(3)
    assert y_null.shape == (3, L, CFG.caption_channels)
    assert torch.equal(y_null[2], model.y_embedder.y_embedding)
    assert "y_embedder.y_embedding" in model.state_dict()


# --- the real architecture, on the meta device --------------------------------------------------------

# Copied from shared/design/opensora-v1.2-state-dicts.md (read off Open-Sora's own modules), N = 0..27.
REAL_TOP = {
    "rope.freqs": [36],
    "x_embedder.proj.weight": [1152, 4, 1, 2, 2],
    "x_embedder.proj.bias": [1152],
    "t_embedder.mlp.0.weight": [1152, 256],
    "t_embedder.mlp.0.bias": [1152],
    "t_embedder.mlp.2.weight": [1152, 1152],
    "t_embedder.mlp.2.bias": [1152],
    "fps_embedder.mlp.0.weight": [1152, 256],
    "fps_embedder.mlp.0.bias": [1152],
    "fps_embedder.mlp.2.weight": [1152, 1152],
    "fps_embedder.mlp.2.bias": [1152],
    "t_block.1.weight": [6912, 1152],
    "t_block.1.bias": [6912],
    "y_embedder.y_embedding": [300, 4096],
    "y_embedder.y_proj.fc1.weight": [1152, 4096],
    "y_embedder.y_proj.fc1.bias": [1152],
    "y_embedder.y_proj.fc2.weight": [1152, 1152],
    "y_embedder.y_proj.fc2.bias": [1152],
    "final_layer.scale_shift_table": [2, 1152],
    "final_layer.linear.weight": [32, 1152],
    "final_layer.linear.bias": [32],
}
REAL_BLOCK = {
    "scale_shift_table": [6, 1152],
    "attn.qkv.weight": [3456, 1152],
    "attn.qkv.bias": [3456],
    "attn.q_norm.weight": [72],
    "attn.k_norm.weight": [72],
    "attn.proj.weight": [1152, 1152],
    "attn.proj.bias": [1152],
    "cross_attn.q_linear.weight": [1152, 1152],
    "cross_attn.q_linear.bias": [1152],
    "cross_attn.kv_linear.weight": [2304, 1152],
    "cross_attn.kv_linear.bias": [2304],
    "cross_attn.proj.weight": [1152, 1152],
    "cross_attn.proj.bias": [1152],
    "mlp.fc1.weight": [4608, 1152],
    "mlp.fc1.bias": [4608],
    "mlp.fc2.weight": [1152, 4608],
    "mlp.fc2.bias": [1152],
}


def test_real_config_state_dict_matches_open_sora():
    with torch.device("meta"):
        real = STDiT3(OPENSORA_V1_2.denoiser)
    expected = dict(REAL_TOP)
    for kind in ("spatial_blocks", "temporal_blocks"):
        for n in range(28):
            expected.update({f"{kind}.{n}.{k}": shape for k, shape in REAL_BLOCK.items()})
    got = {k: list(v.shape) for k, v in real.state_dict().items()}
    assert len(got) == 973
    assert got == expected
    assert sum(p.numel() for p in real.parameters()) == 1_207_643_972
    assert real.y_embedder.y_embedding.numel() == 300 * 4096


# --- parity traps, each against an independent computation ------------------------------------------


def numpy_pos_embed(rows, cols, height, width, dim, input_sq_size=512):
    """Shared notes 1.3 step 5, written out in float64: width (column) coordinate first."""
    h = float(np.float32(height).astype(ml_dtypes.bfloat16))
    w = float(np.float32(width).astype(ml_dtypes.bfloat16))
    scale = math.sqrt(h * w) / input_sq_size
    base = round(math.sqrt(rows * cols))
    omega = 10000.0 ** (-2 * np.arange(dim // 4) / (dim // 2))
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    p_w = (c / scale * base / cols).reshape(-1, 1) * omega
    p_h = (r / scale * base / rows).reshape(-1, 1) * omega
    return np.concatenate([np.sin(p_w), np.cos(p_w), np.sin(p_h), np.cos(p_h)], axis=1)


@pytest.mark.parametrize("rows,cols,height,width", [(4, 7, 64, 112), (3, 5, 48, 80), (30, 53, 480, 854), (45, 80, 720, 1280)])
def test_pos_embed_formula(rows, cols, height, width):
    dim = 64
    got = pos_embed_2d(rows, cols, round_to_bf16(torch.tensor([float(height)])), round_to_bf16(torch.tensor([float(width)])), dim, 512)
    expected = numpy_pos_embed(rows, cols, height, width, dim)
    np.testing.assert_allclose(got[0].numpy(), expected, rtol=0, atol=2e-5)  # float32 trig vs float64


def test_model_adds_pos_embed_of_rounded_size(model):
    """The tokens entering block 0 are the patch embeddings plus the pos-emb of bf16(854) = 856 etc."""
    seen = {}
    h1 = model.x_embedder.register_forward_hook(lambda m, a, out: seen.update(patches=out))
    h2 = model.spatial_blocks[0].register_forward_pre_hook(lambda m, a: seen.update(tokens=a[0]))
    try:
        run(model, B=1, T=2, H=6, W=7, height=482, width=854)  # padded to 3 x 4 patches
    finally:
        h1.remove()
        h2.remove()
    pos = (seen["tokens"] - seen["patches"]).reshape(2, 12, CFG.hidden_size)
    expected = numpy_pos_embed(3, 4, 482, 854, CFG.hidden_size)
    for frame in pos:  # the same table for every frame
        np.testing.assert_allclose(frame.numpy(), expected, rtol=0, atol=2e-5)


def test_round_to_bf16_matches_a_real_bf16_cast():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        (rng.standard_normal(200_000) * np.exp(rng.uniform(-60, 60, 200_000))).astype(np.float32),
        ((rng.integers(128, 256, 20_000) + 0.5) * 2.0 ** rng.integers(-100, 100, 20_000).astype(float)).astype(np.float32),  # ties
        np.arange(0, 4096, 0.25, dtype=np.float32),
        np.array([0.0, -0.0, np.inf, -np.inf, 854, 999.5, 998, 1e-30], np.float32),
    ])
    expected = values.astype(ml_dtypes.bfloat16).astype(np.float32)  # independent of torch
    got = round_to_bf16(torch.from_numpy(values)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(round_to_bf16(torch.tensor([float("nan")])).item())


def test_timestep_fps_and_size_are_rounded_to_bf16(model):
    at_1000 = run(model, timestep=(1000.0, 1000.0))
    for same in (999.5, 998.0, 1001.0):  # all round to 1000 in bf16 (multiples of 4 there)
        torch.testing.assert_close(run(model, timestep=(same, same)), at_1000, rtol=0, atol=0)
    assert not torch.allclose(run(model, timestep=(996.0, 996.0)), at_1000)
    at_856 = run(model, B=1, width=856)
    torch.testing.assert_close(run(model, B=1, width=854), at_856, rtol=0, atol=0)  # 854 -> 856
    assert not torch.allclose(run(model, B=1, width=850), at_856)  # 850 -> 848


def test_text_beyond_the_mask_is_ignored(model):
    """The null caption is cut at the conditional prompt's length: rows past the mask must not matter."""
    kw = inputs(B=2, lengths=[5, 12])
    with torch.no_grad():
        base = model(**kw)
        y = kw["y"].clone()
        y[0, 5:] = 100.0
        y[1, 12:] = -100.0
        torch.testing.assert_close(model(**{**kw, "y": y}), base, rtol=1e-5, atol=1e-5)
        y[0, :5] = 100.0  # the real tokens do matter
        assert (model(**{**kw, "y": y})[0] - base[0]).abs().max() > 1e-2


def test_fully_masked_text_gives_no_nan(model):
    out = run(model, B=1, lengths=[0])
    assert torch.isfinite(out).all()


def test_rope_formula():
    """Interleaved pairs (2k, 2k+1) rotated by pos * 10000**(-2k/D) (rotary_embedding_torch, "lang")."""
    D, T = 16, 5
    rope = STDiT3(CFG).rope
    np.testing.assert_allclose(rope.freqs.detach().numpy(), 10000.0 ** (-np.arange(0, D, 2) / D), rtol=1e-6)
    x = torch.randn(2, T, 3, D)  # [batch, positions, heads, head_dim], the attention's layout
    got = apply_rope(x, *rope(T, x.device)).numpy()
    a, b = x.numpy()[..., 0::2], x.numpy()[..., 1::2]
    theta = (np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, D, 2) / D))[:, None]
    expected = np.empty_like(x.numpy())
    expected[..., 0::2] = a * np.cos(theta) - b * np.sin(theta)
    expected[..., 1::2] = b * np.cos(theta) + a * np.sin(theta)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_rope_only_in_temporal_blocks(model):
    """Spatial blocks commute with a permutation of the tokens inside each frame (no positional term);
    temporal blocks commute with a permutation of frames only once RoPE is switched off."""
    B, T, S, C = 1, 4, 6, CFG.hidden_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T * S, C, generator=g)
    y = torch.randn(B, L, C, generator=g)
    key_bias = torch.zeros(B, 1, 1, L)
    t_mlp = (torch.randn(B, 1, 6 * C, generator=g) * 0.1).expand(B, T, 6 * C)  # the same modulation in every frame
    rope = model.rope(T, x.device)
    no_rope = (torch.ones_like(rope[0]), torch.zeros_like(rope[1]))

    def permute(v, perm, axis):  # axis 1 = frames, 2 = tokens within a frame
        return v.reshape(B, T, S, C).index_select(axis, perm).reshape(B, T * S, C)

    spatial, temporal = model.spatial_blocks[0], model.temporal_blocks[0]
    s_perm, t_perm = torch.randperm(S, generator=g), torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = spatial(x, y, key_bias, t_mlp, T, S)
        torch.testing.assert_close(spatial(permute(x, s_perm, 2), y, key_bias, t_mlp, T, S), permute(out, s_perm, 2), rtol=1e-5, atol=1e-5)
        out = temporal(x, y, key_bias, t_mlp, T, S, rope)
        assert not torch.allclose(temporal(permute(x, t_perm, 1), y, key_bias, t_mlp, T, S, rope), permute(out, t_perm, 1), atol=1e-4)
        out = temporal(x, y, key_bias, t_mlp, T, S, no_rope)
        torch.testing.assert_close(temporal(permute(x, t_perm, 1), y, key_bias, t_mlp, T, S, no_rope), permute(out, t_perm, 1), rtol=1e-5, atol=1e-5)


def test_unpatchify_order(model):
    """Per token the 32 outputs are (Tp=1, Hp=2, Wp=2, C_out=8) with C_out fastest."""
    T, H, W, Co = 2, 3, 4, CFG.out_channels
    tokens = torch.arange(T * H * W * 4 * Co, dtype=torch.float32).reshape(1, T * H * W, 4 * Co)
    out = model.unpatchify(tokens, T, H, W)
    assert out.shape == (1, Co, T, 2 * H, 2 * W)
    for t, r, c, hp, wp, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 0, 5), (0, 1, 2, 0, 1, 7), (1, 0, 1, 1, 1, 2)]:
        token = (t * H + r) * W + c
        assert out[0, ch, t, 2 * r + hp, 2 * c + wp] == tokens[0, token, (hp * 2 + wp) * Co + ch]


# --- ONNX --------------------------------------------------------------------------------------------


class FirstChannels(torch.nn.Module):
    """The exported denoiser returns only the velocity channels (the spec's output `v`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, timestep, y, mask, fps, height, width, x_mask):
        return self.model(x, timestep, y, mask, fps, height, width, x_mask)[:, : CFG.in_channels]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter: fast, and checked here
@pytest.mark.parametrize("opset", [18, 20])
def test_onnx_export_matches_torch(model, tmp_path, opset):
    ort = pytest.importorskip("onnxruntime")
    spec = component_specs(OPENSORA_V1_2_TINY)["denoiser"]
    names = [t.name for t in spec.inputs]
    wrapped = FirstChannels(model).eval()
    sample = spec.sample_inputs(seed=0)
    path = tmp_path / "denoiser.onnx"
    torch.onnx.export(
        wrapped, tuple(torch.from_numpy(sample[n]) for n in names), path, input_names=names,
        output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(), opset_version=opset, dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for sizes in ({"batch": 1, "latent_frames": 3, "latent_height": 6, "latent_width": 7}, {"batch": 2, "latent_frames": 1, "latent_height": 2, "latent_width": 5}):
        feed = spec.sample_inputs(sizes, seed=1)
        feed["timestep"] = np.array([999.5, 1000.0][: sizes["batch"]], np.float32)  # rounded inside the graph too
        feed["x_mask"][0, 0] = 0  # a conditioned frame (t=0 modulation) in every case
        with torch.no_grad():
            expected = wrapped(*(torch.from_numpy(feed[n]) for n in names)).numpy()
        got = session.run(None, feed)[0]
        assert got.shape == expected.shape == (sizes["batch"], 4, sizes["latent_frames"], sizes["latent_height"], sizes["latent_width"])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# --- x_mask: conditioned frames modulated as timestep 0 ---------------------------------------------


def _select(x_mask, a, b, T):  # Open-Sora's t_mask_select: per frame, a where x_mask else b ([B, T*S, C])
    B, N, C = a.shape
    keep = x_mask[:, :, None, None]
    return torch.where(keep, a.reshape(B, T, -1, C), b.reshape(B, T, -1, C)).reshape(B, N, C)


def _open_sora_forward(model, x_mask, x, timestep, y, mask, fps, height, width):
    """Open-Sora's x_mask structure, written out independently: both modulations computed over the whole
    sequence, outputs (not parameters) selected per frame, gates selected after multiplying. Even H/W only."""
    from osx.export.stdit3 import t2i_modulate

    B, _, T, H, W = x.shape
    S = (H // 2) * (W // 2)
    fps_e = model.fps_embedder(round_to_bf16(fps))
    t = model.t_embedder(round_to_bf16(timestep)) + fps_e
    t0 = model.t_embedder(torch.zeros_like(timestep)) + fps_e
    t_mlp, t0_mlp = model.t_block(t), model.t_block(t0)
    y = model.y_embedder(y)
    key_bias = ((mask.float() - 1) * 1e4)[:, None, None, :]
    h = model.x_embedder(x)
    pos = pos_embed_2d(H // 2, W // 2, round_to_bf16(height), round_to_bf16(width), CFG.hidden_size, CFG.input_sq_size)
    h = (h.reshape(B, T, S, -1) + pos[:, None]).reshape(B, T * S, -1)
    rope = model.rope(T, h.device)
    blocks = [b for pair in zip(model.spatial_blocks, model.temporal_blocks) for b in pair]
    for blk in blocks:
        p = (blk.scale_shift_table[None] + t_mlp.reshape(B, 6, -1)).chunk(6, 1)
        p0 = (blk.scale_shift_table[None] + t0_mlp.reshape(B, 6, -1)).chunk(6, 1)
        n1 = blk.norm1(h)
        m = _select(x_mask, t2i_modulate(n1, p[0], p[1]), t2i_modulate(n1, p0[0], p0[1]), T)
        C = m.shape[-1]
        if blk.temporal:
            a = blk.attn(m.reshape(B, T, S, C).transpose(1, 2).reshape(B * S, T, C), rope)
            a = a.reshape(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
        else:
            a = blk.attn(m.reshape(B * T, S, C)).reshape(B, T * S, C)
        h = h + _select(x_mask, p[2] * a, p0[2] * a, T)
        h = h + blk.cross_attn(h, y, key_bias)
        n2 = blk.norm2(h)
        m = blk.mlp(_select(x_mask, t2i_modulate(n2, p[3], p[4]), t2i_modulate(n2, p0[3], p0[4]), T))
        h = h + _select(x_mask, p[5] * m, p0[5] * m, T)
    fl = model.final_layer
    sh, sc = (fl.scale_shift_table[None] + t[:, None]).chunk(2, 1)
    sh0, sc0 = (fl.scale_shift_table[None] + t0[:, None]).chunk(2, 1)
    nf = fl.norm_final(h)
    h = fl.linear(_select(x_mask, t2i_modulate(nf, sh, sc), t2i_modulate(nf, sh0, sc0), T))
    return model.unpatchify(h, T, H // 2, W // 2)


def test_x_mask_matches_open_sora_structure(model):
    kw = inputs(B=2, T=4, H=6, W=8)
    x_mask = torch.tensor([[False, True, True, False], [True, True, False, True]])
    with torch.no_grad():
        got = model(**kw, x_mask=x_mask.float())
        want = _open_sora_forward(model, x_mask, **kw)
        plain = model(**kw)
    # fp32 both ways; only the order of elementwise operations differs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the conditioned frames change a lot (the issue measured 24 % of scale against Open-Sora's own code)
    assert (got - plain).abs().mean() > 0.05 * plain.abs().mean()


def test_x_mask_all_ones_is_text_to_video_and_all_zeros_is_timestep_zero(model):
    kw = inputs(B=2, T=3)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw, x_mask=torch.ones(2, 3)), model(**kw), rtol=0, atol=0)
        zeros = model(**kw, x_mask=torch.zeros(2, 3))
        t_zero = model(**{**kw, "timestep": torch.zeros(2)})
    torch.testing.assert_close(zeros, t_zero, rtol=1e-6, atol=1e-6)
