"""Tokenizers: the tiny deterministic builder, the T5 sentencepiece converter, and the runtime's
padding / truncation against transformers called the way Open-Sora calls it."""

import hashlib
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

from osx.errors import BundleError
from osx.export.tokenizer import WORDS, build_tiny_tokenizer, convert_t5_sentencepiece
from osx.models import OPENSORA_V1_2_TINY, TextEncoderConfig
from osx.runtime.tokenizer import PromptTruncatedWarning, TextTokenizer

TINY = OPENSORA_V1_2_TINY.text_encoder


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer(TINY)


def test_tiny_layout(tiny):
    assert tiny.get_vocab_size() == TINY.vocab_size == 1024
    assert [tiny.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    assert tiny.encode("a dog").ids[-1] == 1  # </s> appended
    assert tiny.encode("").ids == [1]


def test_tiny_covers_ascii_and_common_words(tiny):
    for code in range(128):
        assert 2 not in tiny.encode(f"x{chr(code)}y").ids, f"ASCII {code} gives <unk>"
    assert 2 not in tiny.encode("".join(map(chr, range(128)))).ids
    for word in ("cat", "beach", "sunset", "camera", "aesthetic", "score"):
        assert len(tiny.encode(word).ids) == 2, word  # one piece plus </s>
    assert tiny.decode(tiny.encode("A cat walks on the beach at sunset.").ids) == "A cat walks on the beach at sunset."


def test_tiny_vocab_size_follows_the_config():
    assert build_tiny_tokenizer(TextEncoderConfig(vocab_size=300)).get_vocab_size() == 300
    with pytest.raises(ValueError, match="below"):
        build_tiny_tokenizer(TextEncoderConfig(vocab_size=100))


def test_tiny_is_the_same_bytes_every_time(tiny):
    assert build_tiny_tokenizer(TINY).to_str() == tiny.to_str()
    # Fresh interpreters with different string-hash seeds: nothing may depend on set/dict hash order.
    code = ("import hashlib; from osx.export.tokenizer import build_tiny_tokenizer; from osx.models import OPENSORA_V1_2_TINY as m; "
            "print(hashlib.sha256(build_tiny_tokenizer(m.text_encoder).to_str().encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, check=True).stdout.strip() for seed in ("1", "2")}
    assert digests == {hashlib.sha256(tiny.to_str().encode()).hexdigest()}


def prompts_of(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def test_padding_truncation_match_transformers(tiny):
    # Open-Sora: tokenizer(texts, max_length=L, padding="max_length", truncation=True, add_special_tokens=True)
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tiny, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    rng = random.Random(0)
    prompts = ["", "a", "A cat walks on the beach at sunset.", "x" * 31] + [prompts_of(rng, n) for n in (5, 30, 31, 32, 60)]
    L = TINY.max_length
    with pytest.warns(PromptTruncatedWarning):
        ids, mask = TextTokenizer(tiny, L).encode(prompts)
    want = hf(prompts, max_length=L, padding="max_length", truncation=True, add_special_tokens=True, return_tensors="np")
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape == (len(prompts), L)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert (ids[:, -1][mask[:, -1] == 1] == 1).all()  # truncated rows still end with </s>


def test_truncation_warning_names_the_counts(tiny):
    tok = TextTokenizer(tiny, 8)
    with pytest.warns(PromptTruncatedWarning, match=r"prompt 1 has 12 tokens; the text encoder takes 8, so the last 4"):
        ids, mask = tok.encode(["a cat", "a b c d e f g h i j k"])
    assert ids[1].tolist() == tiny.encode("a b c d e f g").ids  # first 7 tokens, then </s>
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.encode(["a b c d e f g"])  # exactly 8 tokens with </s>: no warning
    assert tok.count("a b c d e f g") == 8


def test_load_from_file_and_corrupt_file(tiny, tmp_path):
    path = tmp_path / "tokenizer.json"
    tiny.save(str(path))
    for source in (path, str(path)):
        ids, _ = TextTokenizer(source, 16).encode(["a dog"])
        assert ids[0, :3].tolist() == tiny.encode("a dog").ids
    path.write_text("{not json")
    with pytest.raises(BundleError, match="cannot load tokenizer"):
        TextTokenizer(path, 16)
    with pytest.raises(BundleError):
        TextTokenizer(tmp_path / "missing.json", 16)


def test_convert_t5_sentencepiece_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(prompts_of(rng, rng.randint(3, 15)) for _ in range(3000)))
    prefix = tmp_path / "t5"
    spm.SentencePieceTrainer.train(  # T5's layout: pad 0, eos 1, unk 2, no bos
        input=str(corpus), model_prefix=str(prefix), vocab_size=400, model_type="unigram", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    tok = convert_t5_sentencepiece(str(prefix) + ".model", extra_ids=5)
    assert tok.get_vocab_size() == sp.get_piece_size() + 5
    assert tok.token_to_id("<extra_id_0>") == tok.get_vocab_size() - 1  # T5: sentinels count down from the top
    texts = [prompts_of(rng, rng.randint(1, 25)) for _ in range(50)] + [
        "", "  two  spaces  ", "Unseen words: zebra, quokka!", "numbers 123 4.5", "tab\tand newline\nhere", "café ÄÖÜ ß"]
    for text in texts:
        assert tok.encode(text).ids == sp.encode(text) + [1], repr(text)


def test_convert_missing_file(tmp_path):
    from osx.errors import CheckpointError

    with pytest.raises(CheckpointError, match="spiece.model"):
        convert_t5_sentencepiece(tmp_path / "nope.model")
