"""t2i2v's components as graphs: Flux.1-dev and its AE decoder through the v2.0 forward adapters, exported (Flux
streamed from a random checkpoint in BFL's layout) and validated in onnxruntime against PyTorch as the other
components are (1e-4 of the output's scale, at the spec's two validation shapes); then the runtime's image step
over those graphs against the torch reference step.

Tolerance of the last: the graphs' float32 results differ from torch's by up to 1e-5 of scale (validation
above), and every step rounds the latent to bf16 (spacing 2^-8 relative), so such a difference flips a rounding
now and then and the flip is carried on: measured over 4 steps, 1.4 % of the latent's values one bf16 step
apart, 3.9e-4 relative in norm (the issue's 1e-4 holds for the runtime's own arithmetic: over the torch modules,
tests/test_t2i2v.py, the latents are equal); asserted: 1e-3 relative, the PNG within 2 uint8 levels."""

import dataclasses

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.families import component_specs
from osx.families.opensora_v2_0 import t2i_component_specs
from osx.manifest import ComponentEntry
from osx.models_v2 import OPENSORA_V2_0_TINY as TINY, T2I_CONFIGS, rope_tables, t2i_image_size
from osx.runtime import t2i2v
from osx.runtime.backends import OrtBackend
from osx.runtime.pipeline_v2 import PipelineV2

torch = pytest.importorskip("torch")
from osx.export.adapters_v2 import forward_adapter  # noqa: E402 (needs torch)
from osx.export.flux_ae import FluxAEDecoder  # noqa: E402
from osx.export.init import seeded_init_, write_random_part  # noqa: E402
from osx.export.mmdit import MMDiT, video_rope  # noqa: E402
from osx.export.sampler_flux import reference_t2i  # noqa: E402
from test_runtime_pipeline_v2 import MMDiTOnImageTables, TorchBackend, reference, v2_bundle  # noqa: E402,F401 (fixtures)

T2I = T2I_CONFIGS[TINY.name]
SPECS = t2i_component_specs(TINY)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_flux_adapter_is_flux_with_the_interleaved_image_rope():
    flux = seeded_init_(MMDiT(T2I.mmdit), seed=1).eval()
    h, w, L = 3, 4, 8
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, h * w, 64, generator=g), torch.randn(1, L, T2I.mmdit.context_in_dim, generator=g)
    t, y, guidance = torch.tensor([0.7]), torch.randn(1, T2I.mmdit.vec_in_dim, generator=g), torch.tensor([4.0])
    cos, sin = (torch.from_numpy(a) for a in rope_tables(T2I.mmdit, 1, h, w))
    with torch.no_grad():
        got = forward_adapter("t2i_denoiser", flux)(img, txt, t, y, guidance, cos, sin)
        want = flux(img, txt, t, y, None, *video_rope(T2I.mmdit, L, 1, h, w), guidance=guidance)
        other = forward_adapter("t2i_denoiser", flux)(img, txt, t, y, guidance * 0 + 1.0, cos, sin)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (other - want).abs().max() > 1e-3 * want.abs().max()  # the guidance input matters


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """Flux streamed from a random flux1-dev-layout checkpoint and the AE decoder, each exported and validated."""
    from osx.export.checkpoint import CheckpointReader
    from osx.export.onnx_export import export_component, export_streamed
    from osx.export.stream import Weights
    from osx.export.validate import validate_component, validation_shapes

    root = tmp_path_factory.mktemp("t2i-graphs")
    factory = lambda: MMDiT(T2I.mmdit)  # noqa: E731
    reader = CheckpointReader(write_random_part(factory, root / "flux1-dev.safetensors", torch.float32, 0))
    info = export_streamed(Weights(factory, reader), SPECS["t2i_denoiser"], root / "t2i_denoiser.onnx", adapter=forward_adapter)
    assert info.weights_check["from_checkpoint_sha256_ok"] == len(reader.keys())
    flux = Weights(factory, reader).materialize(torch.float32).eval()
    ae = seeded_init_(FluxAEDecoder(T2I.ae), seed=4).eval()
    rows = validate_component(flux, root / "t2i_denoiser.onnx", SPECS["t2i_denoiser"], validation_shapes(SPECS["t2i_denoiser"]),
                              adapter=forward_adapter)
    export_component(ae, SPECS["t2i_decoder"], root / "t2i_decoder.onnx", adapter=forward_adapter)
    rows += validate_component(ae, root / "t2i_decoder.onnx", SPECS["t2i_decoder"], validation_shapes(SPECS["t2i_decoder"]),
                               adapter=forward_adapter)
    return root, flux, ae, rows


def test_both_export_and_validate(graphs):
    import onnx

    root, _, _, rows = graphs
    assert len(rows) == 4 and all(r["ok"] and r["max_rel"] < 1e-4 for r in rows), rows
    assert {r["component"] for r in rows} == {"t2i_denoiser", "t2i_decoder"}
    for name, spec in SPECS.items():
        graph = onnx.load(str(root / f"{name}.onnx"), load_external_data=False).graph
        assert [i.name for i in graph.input] == [t.name for t in spec.inputs]


def test_image_step_over_the_graphs_equals_the_reference(graphs, v2_bundle, reference):
    root, flux, ae, _ = graphs
    reference.t5_tokenizer.save(str(root / "tokenizer.json"))
    reference.clip_tokenizer.save(str(root / "clip_tokenizer.json"))
    entries = {n: ComponentEntry(file=f"{n}.onnx", precision="fp32", io=s) for n, s in SPECS.items()}
    bundle = Bundle(root, dataclasses.replace(v2_bundle.manifest, components={**v2_bundle.manifest.components, **entries}))
    specs, L = component_specs(TINY), TINY.t5.max_length
    fns = {"text_encoder": lambda ids: reference.t5(ids, torch.ones_like(ids)), "clip": reference.clip,
           "denoiser": MMDiTOnImageTables(reference.mmdit, L), "vae_decoder": reference.vae.decode_tile}
    backends = {n: TorchBackend(n, specs[n], fn) for n, fn in fns.items()}
    pipe = PipelineV2(bundle, {**backends, **{n: OrtBackend(bundle, n) for n in SPECS}})
    request = pipe.prepare_request("a lighthouse at dusk", aspect_ratio="16:9", seed=9)
    latents = []
    decoder_run = pipe.backends["t2i_decoder"].run
    pipe.backends["t2i_decoder"].run = lambda inputs: latents.append(inputs["z"]) or decoder_run(inputs)
    png = t2i2v.first_frame(pipe, request, steps=4)
    want = reference_t2i(reference, flux, ae, T2I, "a lighthouse at dusk", aspect_ratio="16:9",
                         video_height=request.height, video_width=request.width, seed=9, num_steps=4)
    assert png.shape == (*t2i_image_size(T2I, "16:9"), 3) == want.png.shape
    got = latents[0]
    err = float(np.linalg.norm(got - want.latent[:, :, 0]) / np.linalg.norm(want.latent))
    assert err < 1e-3, f"latent {err:.2e} relative"  # measured 3.9e-4: 1.4 % of the values one bf16 rounding apart
    assert np.max(np.abs(png.astype(int) - want.png)) <= 2 and np.mean(png != want.png) < 0.05  # measured 2 levels, 1.1 %
