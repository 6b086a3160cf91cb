"""Flux.1-dev through the one MMDiT module (t2i2v's image model): each switch against an independent
computation, the real config's BFL layout on the meta device, and strict loading through checkpoint_v2.

Equivalences run the module in float32 on both sides; tolerance 1e-5 relative to the output's scale. The
RoPE re-derivation runs in float64 (complex exponentials)."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from osx.errors import CheckpointError
from osx.export.checkpoint import save_safetensors
from osx.export.checkpoint_v2 import find_parts, load_part, resolve_parts
from osx.export.init import seeded_init_
from osx.export.mmdit import MMDiT, apply_rope, position_ids, rope_tables, timestep_embedding, video_rope
from osx.models_v2 import FLUX1_DEV, FLUX1_DEV_TINY, FLUX_MODELS, OPENSORA_V2_0_TINY
from osx.profiles.params_v2 import mmdit_params

CFG = FLUX1_DEV_TINY
TOL = 1e-5
D = CFG.head_dim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def close(got, want, tol=TOL):
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


def run(model, guidance=4.0, T=1, h=3, w=4, L=5, seed=0):
    """One forward of a Flux-switched model on seeded inputs (no cond; guidance scale `guidance`)."""
    g = torch.Generator().manual_seed(seed)
    N, cfg = T * h * w, model.cfg
    cos, sin = video_rope(cfg, L, T, h, w)
    img = torch.randn(2, N, cfg.in_channels, generator=g)
    txt = torch.randn(2, L, cfg.context_in_dim, generator=g)
    y = torch.randn(2, cfg.vec_in_dim, generator=g)
    with torch.no_grad():
        return model(img, txt, torch.tensor([0.9964526, 0.33266]), y, None, cos, sin, torch.full((2,), guidance))


def flux(cfg=CFG, seed=0):
    return seeded_init_(MMDiT(cfg), seed=seed).eval()


# --- interleaved RoPE ----------------------------------------------------------------------------------


def test_interleaved_rope_is_complex_rotation_of_adjacent_pairs():
    """z_j = x_{2j} + i*x_{2j+1} times exp(i*angle_j); angle_j = pos_a * theta**(-2m/d_a), axes in order."""
    ids = torch.cat([torch.zeros(2, 3), position_ids(2, 3, 4)])
    angles = torch.stack([ids[:, a].double() * CFG.theta ** (-2.0 * m / d)
                          for a, d in enumerate(CFG.axes_dim) for m in range(d // 2)], dim=-1)
    cos, sin = rope_tables(CFG, ids)
    x = torch.randn(2, CFG.num_heads, ids.shape[0], D)
    z = torch.complex(x[..., 0::2].double(), x[..., 1::2].double()) * torch.exp(1j * angles)
    close(apply_rope(x, cos[None], sin[None], interleaved=True), torch.stack([z.real, z.imag], -1).flatten(-2))
    # the rotate-half layout on the same positions is a different function
    rh_cos, rh_sin = rope_tables(dataclasses.replace(CFG, interleaved_rope=False), ids)
    assert (apply_rope(x, rh_cos[None], rh_sin[None]) - apply_rope(x, cos[None], sin[None], True)).abs().max() > 1e-2


def head_perm(n_heads: int) -> torch.Tensor:
    """Rows of q (or k) [n_heads * D] in interleaved order from rotate-half order: the rotated pair
    (j, j + D/2) becomes (2j, 2j + 1) within each head."""
    within = torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], dim=-1).flatten()
    return torch.cat([h * D + within for h in range(n_heads)])


def to_interleaved(state: dict, cfg) -> dict:
    """Rotate-half weights -> interleaved ones: q and k output rows (and the q/k-norm scales) permuted."""
    C, perm = cfg.hidden_size, head_perm(cfg.num_heads)
    rows = torch.cat([perm, C + perm])  # q, then k; v and the MLP input keep their order
    out = {}
    for k, v in state.items():
        if k.endswith(("attn.qkv.weight", "attn.qkv.bias", "linear1.weight", "linear1.bias")):
            v = torch.cat([v[rows], v[2 * C:]])
        elif k.endswith("_norm.scale"):
            v = v[perm[:D]]
        out[k] = v
    return out


def test_interleaved_equals_rotate_half_with_permuted_heads():
    rotate_half = flux(dataclasses.replace(CFG, interleaved_rope=False))
    interleaved = MMDiT(CFG).eval()
    interleaved.load_state_dict(to_interleaved(rotate_half.state_dict(), CFG), strict=True)
    want = run(rotate_half)
    close(run(interleaved), want)
    # the same weights unpermuted are not the same function (so the permutation is what makes them agree)
    interleaved.load_state_dict(rotate_half.state_dict(), strict=True)
    assert (run(interleaved) - want).abs().max() > 1e-3 * want.abs().max()


# --- fused q/k/v -----------------------------------------------------------------------------------------


def fuse(state: dict) -> dict:
    """Separate projections -> BFL's fused ones: qkv = [q; k; v], linear1 = [q; k; v_mlp] (rows)."""
    separate = ("q_proj.", "k_proj.", "v_proj.", "v_mlp.")
    out = {k: v for k, v in state.items() if not any(s in k for s in separate)}
    for k in state:
        stem, _, tail = k.rpartition("q_proj.")  # tail: weight / bias
        if not stem:
            continue
        fused, parts = ("qkv", ("q_proj", "k_proj", "v_proj")) if "attn." in stem else ("linear1", ("q_proj", "k_proj", "v_mlp"))
        out[f"{stem}{fused}.{tail}"] = torch.cat([state[f"{stem}{p}.{tail}"] for p in parts])
    return out


def test_fused_qkv_equals_separate_projections():
    separate = flux(dataclasses.replace(CFG, fused_qkv=False))
    fused = MMDiT(CFG).eval()
    fused.load_state_dict(fuse(separate.state_dict()), strict=True)
    close(run(fused), run(separate))


# --- guidance embedding, inputs ----------------------------------------------------------------------------


def test_guidance_is_embedded_like_a_timestep():
    """guidance_in sees [cos(1000 g f_k), sin(1000 g f_k)] (float64 here), and the scale moves the output."""
    m = flux()
    seen = []
    m.guidance_in.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    a = run(m, guidance=4.0)
    half = CFG.timestep_dim // 2
    args = [4000.0 * math.exp(-math.log(10000) * k / half) for k in range(half)]
    want = torch.tensor([math.cos(x) for x in args] + [math.sin(x) for x in args], dtype=torch.float64)
    close(seen[0][0], want, tol=5e-4)  # float32 arguments near 4000 rad: one step is 2.4e-4
    close(seen[0], timestep_embedding(torch.full((2,), 4.0), CFG.timestep_dim, CFG.time_factor))
    assert (run(m, guidance=3.5) - a).abs().max() > 1e-3 * a.abs().max()


def test_missing_or_extra_inputs_are_named():
    m, v2 = flux(), MMDiT(OPENSORA_V2_0_TINY.mmdit)
    img, txt, t, y = torch.zeros(1, 4, 64), torch.zeros(1, 2, 32), torch.zeros(1), torch.zeros(1, 32)
    cos, sin = video_rope(CFG, 2, 1, 2, 2)
    with pytest.raises(ValueError, match="needs guidance"):
        m(img, txt, t, y, None, cos, sin)
    with pytest.raises(ValueError, match="takes no cond"):
        m(img, txt, t, y, torch.zeros(1, 4, 68), cos, sin, torch.ones(1))
    with pytest.raises(ValueError, match="takes no guidance"):
        v2(img, txt, t, y, torch.zeros(1, 4, 68), cos, sin, torch.ones(1))


# --- the real layout, loading --------------------------------------------------------------------------------


def linear(name, out, inp):
    return {f"{name}.weight": [out, inp], f"{name}.bias": [out]}


def bfl_layout() -> dict:
    """BFL's flux1-dev.safetensors names and shapes (black-forest-labs/flux `model.py`, `layers.py`)."""
    C, M = 3072, 12288
    want = {**linear("img_in", C, 64), **linear("txt_in", C, 4096), **linear("final_layer.linear", 64, C),
            **linear("final_layer.adaLN_modulation.1", 2 * C, C)}
    for emb, inp in (("time_in", 256), ("vector_in", 768), ("guidance_in", 256)):
        want.update({**linear(f"{emb}.in_layer", C, inp), **linear(f"{emb}.out_layer", C, C)})
    for n in range(19):
        for s in ("img", "txt"):
            p = f"double_blocks.{n}.{s}"
            want.update({**linear(f"{p}_mod.lin", 6 * C, C), **linear(f"{p}_attn.qkv", 3 * C, C),
                         **linear(f"{p}_attn.proj", C, C), **linear(f"{p}_mlp.0", M, C), **linear(f"{p}_mlp.2", C, M),
                         f"{p}_attn.norm.query_norm.scale": [128], f"{p}_attn.norm.key_norm.scale": [128]})
    for n in range(38):
        p = f"single_blocks.{n}"
        want.update({**linear(f"{p}.linear1", 3 * C + M, C), **linear(f"{p}.linear2", C, C + M),
                     **linear(f"{p}.modulation.lin", 3 * C, C),
                     f"{p}.norm.query_norm.scale": [128], f"{p}.norm.key_norm.scale": [128]})
    return want


def test_real_config_is_bfl_layout_on_meta():
    assert FLUX_MODELS["flux1-dev"] is FLUX1_DEV
    with torch.device("meta"):
        m = MMDiT(FLUX1_DEV)
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    assert got == bfl_layout()
    assert len(got) == 780
    assert sum(int(np.prod(s)) for s in got.values()) == 11_901_408_320
    assert sum(p.numel() for p in m.parameters()) == 11_901_408_320
    assert mmdit_params(FLUX1_DEV).total == 11_901_408_320  # the planner's count from the config alone


def test_flux_file_found_and_loaded_strictly(tmp_path):
    src = flux(seed=3)
    root = tmp_path / "ckpts"
    save_safetensors(src.state_dict(), root / "flux1-dev.safetensors")
    assert find_parts(root) == {"flux": root / "flux1-dev.safetensors"}
    with torch.device("meta"):
        m = MMDiT(CFG)
    load_part(m, root / "flux1-dev.safetensors", "flux")
    for k, want in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], want), k
    assert torch.equal(run(m.eval()), run(src))
    # an explicit flux= path is an allowed part; a v2.0 MMDiT refuses the file, and Flux a v2.0 file
    with pytest.raises(CheckpointError, match="no MMDiT weights"):
        resolve_parts(root)
    with pytest.raises(CheckpointError, match="Flux.1-dev weights, not MMDiT weights"):
        load_part(MMDiT(OPENSORA_V2_0_TINY.mmdit), root / "flux1-dev.safetensors", "mmdit")
    save_safetensors(MMDiT(OPENSORA_V2_0_TINY.mmdit).state_dict(), tmp_path / "v2.safetensors")
    with pytest.raises(CheckpointError, match="MMDiT weights, not Flux.1-dev weights"):
        load_part(MMDiT(CFG), tmp_path / "v2.safetensors", "flux")


def test_flux_file_missing_a_key_is_refused(tmp_path):
    state = {k: v for k, v in flux().state_dict().items() if k != "single_blocks.1.linear1.bias"}
    save_safetensors(state, tmp_path / "flux1-dev.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_part(MMDiT(CFG), tmp_path / "flux1-dev.safetensors", "flux")
    assert e.value.exit_code == 2 and "single_blocks.1.linear1.bias" in e.value.message
