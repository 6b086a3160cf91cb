"""T5 tokenization for the runtime: the bundle's `tokenizer.json` through the `tokenizers` library.

Open-Sora calls its HF tokenizer with max_length=300, padding="max_length", truncation=True,
add_special_tokens=True: ids end with `</s>` (1) — also after truncation, which keeps the first
max_length - 1 tokens — and are padded with `<pad>` (0); the attention mask is 1 on real tokens.
A truncated prompt raises a `PromptTruncatedWarning` naming both token counts.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from osx.errors import BundleError, OsxError


class PromptTruncatedWarning(UserWarning):
    """The prompt has more tokens than the text encoder takes; the tail is dropped."""


class TextTokenizer:
    def __init__(self, tokenizer: str | os.PathLike | Tokenizer, max_length: int, pad_token: str = "<pad>"):
        if isinstance(tokenizer, Tokenizer):
            base = tokenizer
        else:
            try:
                base = Tokenizer.from_file(str(tokenizer))
            except Exception as e:  # tokenizers raises a bare Exception for unreadable / invalid files
                raise BundleError(f"cannot load tokenizer {Path(tokenizer)}: {e}",
                                  hint="the bundle's tokenizer.json is missing or corrupt; re-export the bundle") from None
        self.max_length = int(max_length)
        self.vocab_size = base.get_vocab_size(with_added_tokens=True)
        self.pad_id = _special_id(base, pad_token)  # CLIP pads with its EOS, "<|endoftext|>"
        # Two configured copies: one counts the full length, one truncates and pads like Open-Sora.
        self._full = Tokenizer.from_str(base.to_str())
        self._full.no_truncation()
        self._full.no_padding()
        self._fixed = Tokenizer.from_str(base.to_str())
        self._fixed.enable_truncation(self.max_length)  # keeps room for the appended </s>
        self._fixed.enable_padding(length=self.max_length, pad_id=self.pad_id, pad_token=pad_token)

    def count(self, prompt: str) -> int:
        """Tokens of `prompt` including `</s>`, before truncation."""
        return len(self._full.encode(prompt).ids)

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (input_ids, attention_mask), both int64 [len(prompts), max_length]."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts")
        for i, prompt in enumerate(prompts):
            n = self.count(prompt)
            if n > self.max_length:
                which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                warnings.warn(PromptTruncatedWarning(
                    f"{which} has {n} tokens; the text encoder takes {self.max_length}, so the last "
                    f"{n - self.max_length} are dropped"), stacklevel=2)
        encodings = self._fixed.encode_batch(prompts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(prompts), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(prompts), self.max_length)
        return ids, mask


def check_vocabulary(tokens: int, embedding_rows: int, where: str, error: type[OsxError] = BundleError) -> None:
    """The tokenizer belongs to the text encoder: T5 pads its embedding table to a multiple of 128 rows
    beyond the tokenizer's ids (32,100 ids, 32,128 rows), so the ids must fit the table (else they index past
    it) and fill all but fewer than 128 of its rows (else it is another model's, or a damaged, tokenizer)."""
    if embedding_rows and not embedding_rows - 128 < tokens <= embedding_rows:
        raise error(f"{where}: the tokenizer has {tokens} tokens, the text encoder's embedding has {embedding_rows} rows; "
                    f"a matching tokenizer has {max(1, embedding_rows - 127)}..{embedding_rows}",
                    hint="the tokenizer (spiece.model / tokenizer.json) is corrupt or from another model; use the one "
                    "from the same T5 checkpoint and re-export")


def _special_id(tok: Tokenizer, token: str) -> int:
    i = tok.token_to_id(token)
    if i is None:
        raise BundleError(f"tokenizer has no {token!r} token", hint="a T5 tokenizer.json is expected; re-export the bundle")
    return i
