"""Tokenizers for bundles: `tokenizer.json` files the runtime loads with the `tokenizers` library alone.

* `convert_t5_sentencepiece`: the real T5 v1.1 tokenizer (DeepFloyd/t5-v1_1-xxl ships only
  `spiece.model`), converted the way transformers' AutoTokenizer does it when Open-Sora loads it.
* `build_tiny_tokenizer`: a small T5-like tokenizer for `opensora-v1.2-tiny`, built from a fixed word
  list with no training, so it is the same bytes on every machine and every run.

Both follow T5's layout: `<pad>` = 0, `</s>` = 1, `<unk>` = 2, a Unigram model behind a Metaspace
pre-tokenizer ("▁" marks a word start), and a post-processor that appends `</s>`.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from collections import Counter
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

from osx.models import TextEncoderConfig

SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5
META = "▁"

# Common English words, weighted toward what video prompts describe (subjects, scenes, motion, camera,
# light, colour). Order matters only as a tie-break; the list is part of the tokenizer's definition.
WORDS = """
a an the and or but of in on at to from with without by for as into onto over under above below near far
is are was were be been being has have had do does it its this that these those there here what which who
while when where how very more most some many few all each every other another one two three four five
six seven eight nine ten first second last next up down out off through across along around between behind
front back left right top bottom side center middle inside outside toward away then slowly quickly gently
softly suddenly smoothly still moving motion move moves walking walks walk running runs run flying flies fly
swimming swims jumping dancing sitting standing looking turning falling rising flowing floating spinning
rolling driving riding playing holding eating drinking talking smiling laughing crying sleeping waving
man woman men women person people child children boy girl baby family crowd friends couple girl old young
dog dogs cat cats bird birds horse fish cow sheep lion tiger bear wolf fox deer rabbit elephant monkey
butterfly bee insect animal animals dragon robot car cars truck bus train plane boat ship bicycle bike
city street road bridge building buildings house home room kitchen window door wall floor table chair bed
town village market shop cafe restaurant park garden field farm forest tree trees leaves flower flowers
grass plant plants mountain mountains hill hills valley river lake ocean sea beach sand wave waves water
rain snow ice fire smoke cloud clouds sky sun moon star stars space planet earth world island desert
rock rocks stone cave road path bridge tower castle church temple ruins light lights shadow shadows
morning afternoon evening night sunset sunrise dawn dusk day summer winter spring autumn fall weather storm
wind fog mist dark bright warm cold soft hard golden silver black white red green blue yellow orange
purple pink brown gray grey colorful vibrant vivid pale deep clear blurry sharp detailed beautiful
stunning serene calm peaceful busy quiet loud wild natural urban rural ancient modern futuristic vintage
realistic cinematic dramatic epic aerial drone shot close closeup wide angle view camera pan zoom tilt
tracking static handheld slow timelapse lapse scene background foreground focus depth field frame
video film movie footage clip style art painting animation cartoon anime photo portrait landscape
aesthetic score quality high resolution hd 4k 8k motion fps frames second seconds minute time
big small large tiny huge long short tall wide narrow round flat full empty new open closed glowing shining
sparkling reflecting reflection surface glass metal wood paper fabric hair face eyes hands hand head body
dress shirt hat coat car road highway traffic lane line lines circle circles pattern patterns texture
""".split()


def _printable() -> list[str]:
    return [c for c in string.printable if c not in string.whitespace]  # the 94 visible ASCII characters


def build_tiny_tokenizer(cfg: TextEncoderConfig) -> Tokenizer:
    """A deterministic T5-like Unigram tokenizer with exactly `cfg.vocab_size` entries.

    Vocabulary: the three specials, "▁", every visible ASCII character bare and word-initial (so no
    ASCII text ever maps to <unk>), the word list, then the most frequent 2-5 letter substrings of
    those words until the vocabulary is full. Scores favour whole words, then subwords, then single
    characters; nothing depends on hash order, threads or training.
    """
    if (cfg.pad_token_id, cfg.eos_token_id) != (0, 1):
        raise ValueError(f"T5 layout needs pad=0, eos=1; config has pad={cfg.pad_token_id}, eos={cfg.eos_token_id}")
    chars = _printable()
    pieces: dict[str, float] = dict.fromkeys(SPECIALS, 0.0)
    pieces[META] = -10.0
    pieces.update({c: -12.0 for c in chars})
    pieces.update({META + c: -11.0 for c in chars})
    minimum = len(pieces)
    if cfg.vocab_size < minimum:
        raise ValueError(f"vocab_size {cfg.vocab_size} is below the {minimum} entries ASCII coverage needs")
    words = list(dict.fromkeys(WORDS))  # drop repeats, keep first occurrence
    for rank, word in enumerate(words):
        pieces.setdefault(META + word, -4.0 - rank / 1000)
    subwords = Counter(w[i:i + n] for w in words for n in range(2, 6) for i in range(len(w) - n + 1))
    for rank, (sub, _) in enumerate(sorted(subwords.items(), key=lambda kv: (-kv[1], -len(kv[0]), kv[0]))):
        pieces.setdefault(sub, -8.0 - rank / 1000)
    vocab = list(pieces.items())[: cfg.vocab_size]
    # A real-size vocabulary (random-weight exports of the released model) is filled with pieces no
    # text produces, so the ids span the embedding table as the real tokenizer's do.
    vocab += [(f"<unused_{i}>", -100.0) for i in range(cfg.vocab_size - len(vocab))]

    tok = Tokenizer(Unigram(vocab, unk_id=SPECIALS.index("<unk>"), byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace(Regex(r"[\x00-\x08\x0b\x0e-\x1f\x7f]"), ""),  # control characters
        normalizers.Replace(Regex(r"\s+"), " "),  # tabs, newlines, runs of spaces: one space (as T5's nmt_nfkc)
        normalizers.Strip(),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=META, prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement=META, prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIALS])
    tok.post_processor = _append_eos()
    return tok


def _append_eos() -> processors.TemplateProcessing:
    return processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])


def convert_t5_sentencepiece(spiece_model: str | os.PathLike, extra_ids: int = 100) -> Tokenizer:
    """The T5 v1.1 sentencepiece model as a `tokenizers.Tokenizer` (transformers' own slow->fast path).

    Gives the ids sentencepiece gives, followed by `</s>`; the `extra_ids` sentinel tokens
    (<extra_id_0> is the last id) follow the sentencepiece pieces as in T5 (32000 + 100 = 32100).
    Needs the `export` extra (transformers, sentencepiece, protobuf).
    """
    from transformers import T5Tokenizer

    spiece_model = Path(spiece_model)
    if not spiece_model.is_file():
        from osx.errors import CheckpointError

        raise CheckpointError(f"T5 sentencepiece model {spiece_model} not found",
                              hint="point at the `spiece.model` of the T5 checkpoint folder")
    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained reads a folder holding `spiece.model`
        shutil.copyfile(spiece_model, Path(tmp) / "spiece.model")
        tok = T5Tokenizer.from_pretrained(tmp, extra_ids=extra_ids)
    return Tokenizer.from_str(tok.backend_tokenizer.to_str())
