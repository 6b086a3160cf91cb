"""T5 v1.1 text encoder (Open-Sora v1.2 uses DeepFloyd/t5-v1_1-xxl), built from transformers' T5 stack.

State-dict keys are transformers' T5EncoderModel names (`shared.weight`, `encoder.block.N...`,
`encoder.final_layer_norm.weight`; `encoder.embed_tokens.weight` is the same tensor as `shared.weight`),
so the released `pytorch_model-*.bin` shards load unchanged. Run it in float32: T5 v1.1 overflows in
float16.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from transformers import T5Config, T5EncoderModel

from osx.models import TextEncoderConfig


def t5_config(cfg: TextEncoderConfig) -> T5Config:
    # TextEncoderConfig uses T5Config's field names; max_length is the tokenizer's, not the model's.
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "max_length"}
    return T5Config(
        **fields,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,  # v1.1 unties the LM head; the encoder's embedding is `shared` either way
        attn_implementation="eager",  # T5's relative-position bias only exists on the eager path
    )


class T5TextEncoder(nn.Module):
    """`forward(input_ids [B, L] int64, attention_mask [B, L]) -> last_hidden_state [B, L, d_model]`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        model = T5EncoderModel(t5_config(cfg))
        # Keep T5EncoderModel's two children (not the wrapper) so the state-dict keys carry no prefix.
        self.shared = model.shared
        self.encoder = model.encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
