"""The planner's VAE decoder estimate against an independent computation: liveness over the exported tiny
decoder graph (every tensor's shape from onnxruntime's symbolic shape inference, freed after its last
consumer), its widest point scaled to the real config by channel role and to each shipped bucket's size."""

import functools

import numpy as np
import onnx
import pytest
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from osx.bundle import Bundle
from osx.models import get_model_config
from osx.profiles import load_profile, make_plan, shipped_profiles
from osx.profiles.planner import activation_bytes, vae_spatial_peak_bytes

TINY, REAL = get_model_config("opensora-v1.2-tiny"), get_model_config("opensora-v1.2")


@functools.lru_cache(maxsize=None)
def widest_point(path, z_shape) -> tuple[int, dict[str, list[int]]]:
    """(peak bytes alive at once, {tensor: shape} alive then) for the fp32 graph at input shape `z_shape`."""
    model = onnx.load(str(path))
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, z_shape):
        d.ClearField("dim_param")
        d.dim_value = v
    g = SymbolicShapeInference.infer_shapes(model, auto_merge=True).graph
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in (*g.input, *g.output, *g.value_info)}
    last_use = {name: i for i, n in enumerate(g.node) for name in n.input}
    outputs = {o.name for o in g.output}
    size = lambda name: 4 * int(np.prod(shapes.get(name, [0])))  # noqa: E731
    live, best = {g.input[0].name}, (0, {})
    for i, n in enumerate(g.node):
        live |= {o for o in n.output if o}
        total = sum(size(t) for t in live)
        if total > best[0]:
            best = (total, {t: shapes[t] for t in live if size(t)})
        live = {t for t in live if last_use.get(t, -1) > i or t in outputs}
    return best


@pytest.fixture(scope="module")
def tiny_decoder(tiny_bundle):
    return Bundle.open(tiny_bundle).path("vae_decoder.onnx")


@pytest.mark.parametrize("z_shape", [(1, 4, 5, 8, 8), (1, 4, 2, 4, 6)])
def test_the_formula_is_the_tiny_graphs_widest_point(tiny_decoder, z_shape):
    """Exact, in fp32 on the tiny config: the whole chunk (4 x latent frames) at full resolution is alive."""
    _, _, t, h, w = z_shape
    frames, height, width = TINY.vae.temporal_downsample * t, 8 * h, 8 * w
    peak, tensors = widest_point(tiny_decoder, z_shape)
    full_res = [s for s in tensors.values() if len(s) == 4]
    assert full_res and all(s[0] == frames and s[2:] == [height, width] for s in full_res)
    other = peak - sum(4 * int(np.prod(s)) for s in full_res)
    assert other < 1e-3 * peak  # the rest alive then: shape vectors
    assert vae_spatial_peak_bytes(TINY, frames, height, width, 4) == peak - other


def test_every_shipped_plan_counts_the_scaled_widest_point(tiny_decoder):
    """The tiny graph's widest point, each tensor's channels mapped to the real config's by their index in
    block_out_channels, at every shipped bucket: the planner's VAE term equals it, and no plan that says it
    fits has a component above the budget."""
    _, tensors = widest_point(tiny_decoder, (1, 4, 5, 8, 8))
    tiny_ch, real_ch = TINY.vae.spatial.block_out_channels, REAL.vae.spatial.block_out_channels
    real_channels = [real_ch[tiny_ch.index(s[1])] for s in tensors.values() if len(s) == 4]
    checked = 0
    for name in shipped_profiles():
        plan = make_plan(load_profile(name), REAL)
        assert plan.fits and max(plan.run_peak_bytes, plan.build_peak_bytes) <= (plan.budget_bytes or float("inf")), name
        vae = plan.components["vae_decoder"]
        e = 4 if vae.precision == "fp32" else 2
        for bucket in plan.buckets:
            lat = bucket.latent(REAL)
            frames = REAL.vae.temporal_downsample * REAL.vae.micro_z_frame_size
            hp, wp = 8 * lat["latent_height"], 8 * lat["latent_width"]
            independent = sum(frames * c * hp * wp * e for c in real_channels)
            assert vae_spatial_peak_bytes(REAL, frames, hp, wp, e) == independent
            sizes = {"batch": 1, "latent_frames": REAL.vae.micro_z_frame_size, "latent_height": lat["latent_height"],
                     "latent_width": lat["latent_width"]}
            assert activation_bytes(REAL, "vae_decoder", sizes, vae.precision, fused_attention=True) >= independent
            if vae.device == "gpu":
                assert vae.weight_bytes + independent + vae.workspace_bytes <= plan.budget_bytes, (name, bucket.name)
            checked += 1
    assert checked > 50
