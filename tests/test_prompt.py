"""Prompt preparation vs Open-Sora v1.2 (append_score_to_prompts + clean_caption twice)."""

import ast
import html
import importlib.util
import random
import re
import textwrap
import urllib.parse
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from osx.runtime.prompt import EmptyPromptWarning, clean_caption, prepare_prompt


# Expected values worked out by hand from Open-Sora's source (opensora/utils/inference_utils.py,
# opensora/models/text_encoder/t5.py), not by running this code.
@pytest.mark.parametrize("prompt,expected", [
    ("A cat walks on the beach.", "a cat walks on the beach. aesthetic score: 6.5."),
    ("Sunset. aesthetic score: 5.0.", "sunset. aesthetic score: 5.0."),  # an existing score is kept
    ("Visit https://example.com/page now", "visit now aesthetic score: 6.5."),
    ("<b>Bold</b> ***SALE*** (cheap)", "bold sale cheap aesthetic score: 6.5."),
])
def test_prepare_prompt_examples(prompt, expected):
    assert prepare_prompt(prompt) == expected


def test_no_score_when_disabled():
    assert prepare_prompt("Two dogs", aesthetic_score=None) == "two dogs"


def test_basic_clean_strips_before_the_final_rules():
    # "(" and ")" become spaces; Open-Sora's basic_clean strips, so the leading "-" is then removed.
    # (diffusers' copy of the cleaner lacks that strip and would keep "-cat".)
    assert clean_caption("(-cat)") == "cat"


def test_empty_prompt_is_the_score_suffix_alone_with_a_warning():
    with pytest.warns(EmptyPromptWarning):
        assert prepare_prompt("") == "aesthetic score: 6.5."
    with pytest.warns(EmptyPromptWarning):
        assert prepare_prompt("   ") == "aesthetic score: 6.5."
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_prompt("a dog")  # no warning for a real prompt
        assert prepare_prompt("", aesthetic_score=None, warn_empty=False) == ""  # e.g. an empty negative prompt


@pytest.fixture(scope="module")
def real_clean_caption():
    """Open-Sora's clean_caption with the real ftfy and BeautifulSoup: diffusers' PixArt copy of the
    cleaner (read from its source, so torch is not imported) plus the one line where Open-Sora differs
    (its basic_clean strips after unescaping)."""
    ftfy = pytest.importorskip("ftfy", reason="ftfy is only needed to compare with the original cleaner")
    bs4 = pytest.importorskip("bs4", reason="beautifulsoup4 is only needed to compare with the original cleaner")
    spec = importlib.util.find_spec("diffusers")
    if spec is None:
        pytest.skip("diffusers (the `export` extra) carries the original cleaner")
    path = Path(spec.origin).parent / "pipelines" / "pixart_alpha" / "pipeline_pixart_alpha.py"
    source = path.read_text()
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "PixArtAlphaPipeline")
    parts = {getattr(n, "name", None) or n.targets[0].id: ast.get_source_segment(source, n) for n in cls.body
             if (isinstance(n, ast.FunctionDef) and n.name == "_clean_caption")
             or (isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "bad_punct_regex")}
    line = "caption = html.unescape(html.unescape(caption))"
    func = textwrap.dedent(parts["_clean_caption"])
    assert func.count(line) == 1, "diffusers' cleaner changed; update this oracle"
    namespace = {"re": re, "html": html, "ul": urllib.parse, "ftfy": ftfy, "BeautifulSoup": bs4.BeautifulSoup}
    exec(parts["bad_punct_regex"] + "\n" + func.replace(line, line + ".strip()"), namespace)

    def clean(text):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bs4 warns about inputs that look like URLs / file names
            return namespace["_clean_caption"](SimpleNamespace(bad_punct_regex=namespace["bad_punct_regex"]), text)

    return clean


CASES = [
    "A cat   walks on the beach at SUNSET.", "see www.foo.org/bar and x.com", "<b>bold</b> &amp; <i>it</i> &lt;3",
    "“Quoted” ‘text’ — dash–dash", "file photo.jpg here", "ip 192.168.0.1 done", "#123 tag #123456 and 1234567",
    "this-is-my-cute-cat-video", "jc6640 jc6640vc 6640vc231", "free shipping worldwide download free", "1920x1080 video",
    "time : 12", "a,b.c/d", "'quoted whole'", "ＦＵＬＬ width ﬁne", "中文 and english", "@user hello",
    "tabs\tand\nnewlines\\n literal", "%20encoded+plus", "Ĳssel café naïve", "<script>x=1</script>text<!-- c -->",
    "a < b > c", "page 12 of book", "click for more", "emoji 🎉 rocket", "&#39;apos&#39; &eacute;", "x...y", "a . b",
    "\x1b[31mred\x1b[0m", "snow-capped mountains, 4k, HDR.", "<![CDATA[data]]> &foo; &#x41;",
]
ATOMS = ["cat", "Dog", " ", ".", ",", "-", "_", "'", '"', "(", ")", "*", "#", "@", "&amp;", "&lt;", "&nbsp;", "&foo;",
         "&#65;", "&#x42;", "&#", "<b>", "</b>", "<br/>", "<!-- c -->", "<script>", "</script>", "<![CDATA[x]]>",
         "http://a.com", "www.x.org", "123", "4567890", "é", "“", "’", "—", "\n", "\t", "ﬁ", "Ａ", "中", ":", ";", "+",
         "/", "\\", "jpg", "1.5", "%41", "%3C", "\u2028", "&", "<", ">", "!", "a1b2c3", "4x5", "Ĳ", "\x1b[1m"]


@pytest.mark.filterwarnings("ignore::osx.runtime.prompt.EmptyPromptWarning")
def test_matches_the_original_cleaner(real_clean_caption):
    rng = random.Random(0)
    fuzz = ["".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 12))) for _ in range(600)]
    for text in CASES + fuzz:
        assert prepare_prompt(text) == real_clean_caption(real_clean_caption(text + " aesthetic score: 6.5.")), repr(text)


def test_documented_deviation_mojibake_is_not_repaired(real_clean_caption):
    # ftfy recognises UTF-8 read as Windows-1252 and repairs it; the stdlib cleaner leaves it (module docstring).
    text = "the \u00e2\u20ac\u0153quote\u00e2\u20ac\x9d"  # "the “quote”" decoded with the wrong codec
    assert real_clean_caption(text) == 'the "quote"'
    assert clean_caption(text) != 'the "quote"'
