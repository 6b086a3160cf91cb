"""CLIP ViT-L/14 text tower (Open-Sora v2.0's `vector_in` input), built from transformers' CLIPTextModel.

Open-Sora runs `CLIPTextModel` from `openai/clip-vit-large-patch14` in bf16 with no attention mask (the
causal mask makes padding irrelevant) and uses `pooler_output`: the final-LayerNorm state at the first EOS
token, with no text projection. The released folder holds the whole CLIP model, so its weights file also
has the vision tower, both projections and `logit_scale`: `CLIP_UNUSED_PREFIXES` names what the text tower
legitimately leaves out; every other key must match (see `export/checkpoint_v2.py`).

State-dict keys: `text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.N...`,
`text_model.final_layer_norm.*`, exactly as in the released file.
"""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.nn as nn
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel

from osx.export.tokenizer import META, SPECIALS, build_tiny_tokenizer
from osx.families.opensora_v2_0 import CLIP_UNUSED_PREFIXES  # noqa: F401 (the family declares them)
from osx.models import TextEncoderConfig
from osx.models_v2 import CLIPTextConfig

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def hf_clip_config(cfg: CLIPTextConfig) -> HFCLIPTextConfig:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "max_length"}
    return HFCLIPTextConfig(**fields, attention_dropout=0.0, attn_implementation="eager")


class CLIPTextEncoder(nn.Module):
    """`forward(input_ids [B, max_length] int64) -> pooled [B, hidden_size]`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextModel(hf_clip_config(cfg))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids=input_ids).pooler_output


def build_tiny_clip_tokenizer(cfg: CLIPTextConfig) -> Tokenizer:
    """A deterministic CLIP-like tokenizer with exactly `cfg.vocab_size` entries, for the tiny model.

    Layout as CLIP's: lower-cased text between `<|startoftext|>` and `<|endoftext|>`, which are the last
    two ids; EOS is also the pad. The pieces are the tiny T5 tokenizer's (every ASCII text is covered, so
    no word becomes an unknown token), behind `<unk>` = 0.
    """
    if (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) != (cfg.vocab_size - 2, cfg.vocab_size - 1, cfg.vocab_size - 1):
        raise ValueError("the tiny CLIP tokenizer needs bos = vocab_size-2 and eos = pad = vocab_size-1")
    t5 = json.loads(build_tiny_tokenizer(TextEncoderConfig(vocab_size=cfg.vocab_size)).to_str())
    pieces = [p for p in t5["model"]["vocab"] if p[0] not in SPECIALS]
    vocab = [["<unk>", 0.0]] + pieces[: cfg.vocab_size - 3] + [[BOS, 0.0], [EOS, 0.0]]
    tok = Tokenizer(Unigram([tuple(p) for p in vocab], unk_id=0, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), Tokenizer.from_str(json.dumps(t5)).normalizer])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in ("<unk>", BOS, EOS)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, cfg.bos_token_id), (EOS, cfg.eos_token_id)]
    )
    return tok
