"""Open-Sora v2.0 configurations (torch-free).

Read by every stage like osx/models.py: export builds torch modules from these, the planner estimates memory
from them, the manifest records them. Facts: shared/design/opensora-v2.0.md.
"""

from __future__ import annotations

# --- MMDiT denoiser, T5 + CLIP text encoders, sampler ---------------------------------------------------

# --- HunyuanVideo causal 3D VAE ---------------------------------------------------------------------------
