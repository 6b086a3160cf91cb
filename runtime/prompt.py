"""Open-Sora v1.2 prompt preparation with the standard library only.

Open-Sora's `scripts/inference.py` turns a user prompt into the text T5 sees in two steps:
  1. `append_score_to_prompts`: add " aesthetic score: 6.5." unless the prompt already has one
     (`aes = 6.5` in configs/opensora-v1-2/inference/sample.py; `flow` is None, so no motion score);
  2. `text_preprocessing`: PixArt's `clean_caption` twice (opensora/models/text_encoder/t5.py; the same
     cleaner ships in diffusers' PixArt pipelines).

The cleaner is reproduced rule for rule. Its two third-party helpers are replaced by stdlib equivalents
so the runtime needs neither ftfy nor beautifulsoup4:
  * BeautifulSoup(text, "html.parser").text -> `_html_text`, built on html.parser, the very tokenizer
    bs4's "html.parser" backend drives; like bs4 >= 4.10 it keeps plain text only (no comments, no
    <script>/<style> bodies).
  * ftfy.fix_text -> `_fix_text`: ftfy's deterministic fixers (C1 controls as Windows-1252, Latin
    ligatures, full/half-width forms, curly quotes, line breaks, lone surrogates, terminal escapes,
    control characters, NFC, HTML entities when the text has no "<") repeated until nothing changes.
    Deviation: ftfy's mojibake repair (text decoded with the wrong codec, e.g. "cafÃ©") is heuristic
    and not reproduced; such prompts keep their broken characters.

Empty prompt: Open-Sora does not special-case it. "" gets the suffix and is cleaned to
"aesthetic score: 6.5.", so the video is conditioned on the suffix alone. `prepare_prompt` does the
same and emits an `EmptyPromptWarning` so callers can tell the user.
"""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
import urllib.parse
import warnings
from html.parser import HTMLParser

DEFAULT_AESTHETIC_SCORE = 6.5


class EmptyPromptWarning(UserWarning):
    """The prompt is blank; Open-Sora then conditions on the aesthetic-score suffix alone."""


def prepare_prompt(prompt: str, aesthetic_score: float | None = DEFAULT_AESTHETIC_SCORE, warn_empty: bool = True) -> str:
    """The text Open-Sora v1.2 feeds to T5 for `prompt`: score suffix, then `clean_caption` twice.
    (`warn_empty=False` for text where blank is normal, e.g. a negative prompt.)"""
    if warn_empty and not prompt.strip():
        warnings.warn(
            EmptyPromptWarning("empty prompt: as in Open-Sora, the video is conditioned on the aesthetic-score suffix alone"),
            stacklevel=2,
        )
    return clean_caption(clean_caption(append_aesthetic_score(prompt, aesthetic_score)))


def append_aesthetic_score(prompt: str, aesthetic_score: float | None) -> str:
    if aesthetic_score is None or "aesthetic score:" in prompt:
        return prompt
    return f"{prompt} aesthetic score: {aesthetic_score:.1f}."


# --- clean_caption ---------------------------------------------------------------------------------

# Open-Sora has `[a-zA-Z0-9.\-]+` before the domain: a run of n such characters without a match costs
# O(n^2) (every start scans the run). A host name is at most 253 characters, so {1,253} removes the same
# URLs and keeps the rule linear.
_URL_TLDS = r"[a-zA-Z0-9.\-]{1,253}[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_BAD_PUNCT = "[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]{1,}"
_DASHES = "[\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d]+"
# CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs (ext. A, Yijing, unified)
_CJK = ["[\u31c0-\u31ef]+", "[\u31f0-\u31ff]+", "[\u3200-\u32ff]+", "[\u3300-\u33ff]+",
        "[\u3400-\u4dbf]+", "[\u4dc0-\u4dff]+", "[\u4e00-\u9fff]+"]
_SEPARATORS = re.compile(r"(?:\-|\_)")

# (pattern, replacement) applied in order; the stages between them are in clean_caption itself.
_BEFORE_HTML = [
    ("<person>", "person"),
    (r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TLDS + "))", ""),
    (r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|" + _URL_TLDS + "))", ""),
]
_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),  # @nickname
    *[(p, "") for p in _CJK],
    (_DASHES, "-"),
    (r"[`´«»“”¨]", '"'),
    (r"[‘’]", "'"),
    (r"&quot;?", ""),
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # ip addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),
    lambda text: _SPACELESS.sub(_drop_file_name, text),  # file names: Open-Sora's [\S]+\.(?:png|...), linear
    (r"[\"\']{2,}", '"'),
    (r"[\.]{2,}", " "),
    (_BAD_PUNCT, " "),
    (r"(?<!\s)\s+\.\s+", " "),  # Open-Sora's \s+\.\s+; matches start at a run's first space only, so the
    # lookbehind changes nothing but saves rescanning a long run of spaces from each of its positions
]
_AFTER_FIX = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    # sizes like 1920x1080: Open-Sora's \b\d+\.?\d*[xх×]\d+\.?\d*\b, which matches the same text, written so that
    # a long run of digits is not split every possible way between \d+ and \d* (quadratic)
    (r"\b\d+(?:\.\d*)?[xх×]\d+(?:\.\d*)?\b", ""),
    (r"\b\s+\:\s+", ": "),
    (r"(\D[,\./])\b", r"\1 "),
    (r"\s+", " "),
    # (the original calls caption.strip() here and discards the result: no strip at this point)
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),
    (r"^[\'\_,\-\:;]", ""),
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]


_SPACELESS = re.compile(r"\S+")
_FILE_SUFFIX = re.compile(r"\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)")


def _drop_file_name(word: re.Match) -> str:
    r"""`[\S]+\.(?:png|...)` on one run of non-space characters: the greedy match starts at the run's
    first character and ends after the run's last suffix (the dot at index >= 1); nothing after that
    suffix matches again. One pass over the run instead of one per start position."""
    last = None
    for last in _FILE_SUFFIX.finditer(word.group(), 1):
        pass
    return word.group() if last is None else word.group()[last.end():]


def _apply(rules: list, text: str) -> str:
    for rule in rules:
        text = rule(text) if callable(rule) else re.sub(rule[0], rule[1], text)
    return text


def clean_caption(caption: str) -> str:
    """PixArt's caption cleaner as Open-Sora v1.2 uses it (see the module docstring for deviations)."""
    caption = urllib.parse.unquote_plus(str(caption))
    caption = caption.strip().lower()
    caption = _apply(_BEFORE_HTML, caption)
    caption = _html_text(caption)
    caption = _apply(_AFTER_HTML, caption)
    if len(_SEPARATORS.findall(caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = _SEPARATORS.sub(" ", caption)
    caption = html.unescape(html.unescape(_fix_text(caption))).strip()  # Open-Sora's basic_clean
    caption = _apply(_AFTER_FIX, caption)
    return caption.strip()


# --- stdlib stand-ins for BeautifulSoup(...).text and ftfy.fix_text ------------------------------


class _TextOnly(HTMLParser):
    """The text bs4's "html.parser" builder keeps: same tokenizer, same entity handling, plain text only."""

    _HIDDEN = {"script", "style", "template"}  # bs4 keeps their bodies out of .text

    def __init__(self):
        super().__init__(convert_charrefs=False)  # as bs4: references arrive via handle_*ref below
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag, attrs):
        self.hidden += tag in self._HIDDEN

    def handle_endtag(self, tag):
        self.hidden -= tag in self._HIDDEN and self.hidden > 0

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)

    def unknown_decl(self, data):  # bs4 counts CDATA sections as text
        if data.upper().startswith("CDATA["):
            self.handle_data(data[len("CDATA["):])

    def handle_entityref(self, name):  # unknown names stay literal, without their ";" (as bs4)
        self.handle_data(html.entities.html5.get(name + ";", "&" + name))

    def handle_charref(self, name):
        hexa = name[:1] in "xX"
        m = re.match("[0-9a-fA-F]+" if hexa else "[0-9]+", name[hexa:])
        if m is None:
            return self.handle_data(name)
        self.handle_data(html.unescape(f"&#{name[:hexa]}{m.group()};") + name[hexa + m.end():])


def _html_text(text: str) -> str:
    parser = _TextOnly()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


_LIGATURES = str.maketrans({
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
})
_WIDTH = str.maketrans({0x3000: " ", **{
    i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
    if unicodedata.normalize("NFKC", chr(i)) != chr(i)
}})
_CONTROL = str.maketrans(dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
))
_C1 = re.compile("[\x80-\x9f]")
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _c1_as_cp1252(m: re.Match) -> str:
    try:
        return bytes([ord(m.group())]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are unassigned there: keep them
        return m.group()


def _pair(m: re.Match) -> str:
    hi, lo = (ord(c) for c in m.group())
    return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))


def _fix_text(text: str) -> str:
    unescape = "<" not in text  # ftfy's unescape_html="auto" decides once, before its loop
    while True:
        before = text
        if unescape:
            text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
        text = _C1.sub(_c1_as_cp1252, text)
        text = text.translate(_LIGATURES).translate(_WIDTH)
        text = re.sub("[\u02bc\u2018-\u201b]", "'", re.sub("[\u201c-\u201f]", '"', text))
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n").replace("\x85", "\n")
        text = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_pair, text))
        text = _ANSI.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text
