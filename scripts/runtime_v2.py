"""The Open-Sora v2.0 side of `bench.py runtime --family opensora-v2.0` (scripts/bench_runtime.py).

The bench model: v2.0-tiny's structure (T5 + CLIP -> MMDiT -> HunyuanVideo VAE) with an MMDiT wide
enough that its matmuls, not per-op overhead, set the pace: 256 wide, 4 heads of 64, 2 double-stream +
4 single-stream blocks; 33 frames (9 latent frames) of 64 or 96 px: 144 or 324 image tokens per row.
The text encoders and the VAE stay tiny: the bench times the denoising step only.
"""

from __future__ import annotations

import dataclasses
import time

from osx.models_v2 import OPENSORA_V2_0_TINY, GenerationDefaultsV2

SMALL_V2 = dataclasses.replace(
    OPENSORA_V2_0_TINY,
    name="opensora-v2.0-bench-small",
    mmdit=dataclasses.replace(OPENSORA_V2_0_TINY.mmdit, hidden_size=256, num_heads=4, depth=2, depth_single_blocks=4,
                              axes_dim=(16, 24, 24)),
    defaults=GenerationDefaultsV2(resolution="96px", aspect_ratio="1:1", num_frames=33),
)


class TorchSideV2:
    """The torch reference: one step of its v2.0 sampler (t2v) over the MMDiT in float32 or bfloat16."""

    def __init__(self, cfg, threads: int, prompt: str, seed: int):
        import copy

        import torch

        from osx.export.pipeline_v2 import build_reference_v2

        torch.set_num_threads(threads)
        self.torch, self.cfg, self.prompt, self.seed = torch, cfg, prompt, seed
        self.ref = build_reference_v2(cfg, dtype=torch.float32)
        self.models = {"torch fp32": self.ref.mmdit, "torch bf16": copy.deepcopy(self.ref.mmdit).to(torch.bfloat16)}
        self.state = {}

    def prepare(self, row: str, size: tuple) -> dict:
        """The reference's own text encoding and conditioning (reference_generate_v2's first half)."""
        from osx.export.pipeline_v2 import CLIP_PAD
        from osx.export.sampler_v2 import condition
        from osx.models_v2 import latent_shape
        from osx.models_v2 import negative_prompt_v2, prepare_prompt_v2
        from osx.runtime.scheduler import initial_noise
        from osx.runtime.tokenizer import TextTokenizer

        h, w, f = size
        cfg, ref, torch = self.cfg, self.ref, self.torch
        text = prepare_prompt_v2(self.prompt, cfg.sampler.fps, cfg.sampler.motion_score)
        texts = [text, negative_prompt_v2(None), negative_prompt_v2(None)]
        t5_ids, _ = TextTokenizer(ref.t5_tokenizer, cfg.t5.max_length).encode(texts)
        clip_ids, _ = TextTokenizer(ref.clip_tokenizer, cfg.clip.max_length, pad_token=CLIP_PAD).encode(texts)
        with torch.no_grad():
            t5_ids, clip_ids = torch.from_numpy(t5_ids), torch.from_numpy(clip_ids)
            txt, y_vec = ref.t5(t5_ids, torch.ones_like(t5_ids)), ref.clip(clip_ids)
        shape = (1, *latent_shape(cfg, h, w, f))
        masks, masked_ref = condition("t2v", shape, [])
        self.state[row, size] = (torch.from_numpy(initial_noise(self.seed, shape)), txt, y_vec, masks, masked_ref)
        return {}

    def step(self, row: str, size: tuple) -> dict:
        from osx.export.sampler_v2 import denoise

        model = self.models[row]
        z, txt, y_vec, masks, masked_ref = self.state[row, size]
        dtype = model.img_in.weight.dtype
        t0 = time.perf_counter()
        with self.torch.no_grad():
            denoise(model, z.to(dtype), txt.to(dtype), y_vec.to(dtype), masks=masks, masked_ref=masked_ref,
                    cond_type="t2v", cfg=self.cfg.sampler, num_steps=1)
        return {"s": time.perf_counter() - t0}
