"""Text normalisation for the clean stage: pure functions on strings, no I/O.

Order matters and is fixed (so the same text always normalises to the same bytes):

1. line endings → ``\\n`` (CRLF, lone CR, U+2028/U+2029, NEL, vertical tab, form feed), so every
   later step sees one kind;
2. control and format characters removed (C0/C1 controls except ``\\n``/``\\t``, zero-width spaces
   and joiners, BOMs, bidi marks, soft hyphens: category Cc/Cf), because they are invisible, carry no
   language and would otherwise become byte-fallback tokens the model learns to emit;
3. NFKC, which folds full-width Latin letters and digits, ligatures, NBSP and U+3000 into their
   plain forms so that one word has one spelling (and one token sequence);
4. ``zh`` documents only: optionally traditional → simplified (OpenCC ``t2s``), then ASCII
   ``, : ; ! ?`` after Han characters widened (see below);
5. whitespace: trailing spaces stripped, runs of spaces/tabs inside a line collapsed to one space,
   more than ``max_blank_lines`` blank lines collapsed, leading/trailing blank space of the
   document removed. Leading indentation of a line is kept verbatim: the zh_web documents carry
   code (Rust, bash) whose indentation is meaning, and Makefiles/YAML need their tabs.

Why the CJK punctuation exception: NFKC maps the full-width punctuation of Chinese prose
(``，：；！？（）～…``) to ASCII ``, : ; ! ? ( ) ~ ...``. That is not a spelling fold but a change of
style: a model continually pre-trained on such text learns to write Chinese with ASCII commas, and
the result no longer matches how Chinese is written (or what the evaluation text looks like). With
``keep_cjk_punctuation`` (the default) those characters are protected from NFKC in ``zh``
documents; everything else (full-width Latin and digits included) is still folded. The same
setting goes one step further for one consistent style: an ASCII ``, : ; ! ?`` written directly
after a Han character (or a closing ``）》」』”’】``), as careless web text does, becomes its
full-width form and loses the spaces after it. After digits and Latin letters nothing changes
(``3,000``, ``a: b``, code), so code blocks inside Chinese tutorials keep their syntax.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Any

from cptflow.data.clean_config import CleanConfig

# Full-width punctuation that Chinese prose uses and NFKC would turn into ASCII (measured on the
# demo zh corpus: ， ( ) ： ； ！ ？ ～ … are the ones that occur; the rest of the full-width block,
# such as ／ ． ％ and full-width letters/digits, is folded like any other compatibility form).
CJK_PUNCTUATION = "，：；！？（）～…"
# Han ideographs: CJK Unified (+ Ext A), compatibility ideographs, and the supplementary planes.
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_TO_FULLWIDTH = {",": "，", ":": "：", ";": "；", "!": "！", "?": "？"}
_ASCII_AFTER_HAN_RE = re.compile(f"(?<=[{HAN}）》」』”’】])([,:;!?])[ \t]*")
_PROTECT_RE = re.compile(f"([{CJK_PUNCTUATION}]+)")
_LINE_BREAKS_RE = re.compile("\r\n?|[\u2028\u2029\x85\x0b\x0c]")  # CR, LS, PS, NEL, VT, FF
_INNER_SPACE_RE = re.compile(r"(?<=\S)[ \t]*\t[ \t]*|(?<=\S) {2,}")
# Linear time on any input. `[ \t]+$` alone is quadratic on a long run of spaces inside a line: the
# search retries at every position of the run, and each try scans to the run's end before `$` fails
# (100,000 spaces took 55 s). Starting only where a run starts (the lookbehind) and never giving
# characters back (possessive `++`) scans each run once.
_TRAILING_SPACE_RE = re.compile(r"(?<![ \t])[ \t]++$", re.MULTILINE)


def is_zh(lang: str) -> bool:
    """``zh``, ``zh-Hant``, ``zh_CN`` ... all count as Chinese."""
    return lang == "zh" or lang.startswith(("zh-", "zh_"))


def _is_removable(ch: str) -> bool:
    return ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cf")


def remove_control(text: str) -> tuple[str, int]:
    """Drop control/format characters except newline and tab; return (text, number removed)."""
    # Look at each distinct character once (a document has a few hundred), then delete in C.
    bad = {ord(ch): None for ch in set(text) if _is_removable(ch)}
    if not bad:
        return text, 0
    out = text.translate(bad)
    return out, len(text) - len(out)


def nfkc(text: str, keep_cjk_punctuation: bool) -> str:
    """NFKC, optionally leaving :data:`CJK_PUNCTUATION` untouched (see the module docstring)."""
    if not keep_cjk_punctuation:
        return unicodedata.normalize("NFKC", text)
    parts = _PROTECT_RE.split(text)
    # split() with one capturing group alternates: text, protected run, text, ...
    return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))


def fullwidth_after_han(text: str) -> tuple[str, int]:
    """ASCII ``, : ; ! ?`` right after a Han character → full-width; return (text, replacements)."""
    return _ASCII_AFTER_HAN_RE.subn(lambda m: _TO_FULLWIDTH[m.group(1)], text)


@functools.lru_cache(maxsize=1)
def _t2s_converter() -> Any:
    # Built once per process (about 7 ms each): the converter holds only OpenCC's read-only tables.
    try:
        import opencc
    except ImportError as e:  # pragma: no cover - opencc is a core dependency
        raise ValueError("clean.t2s is true but the 'opencc' package is not installed (pip install opencc)") from e
    return opencc.OpenCC("t2s")


def to_simplified(text: str) -> tuple[str, int]:
    """Traditional → simplified with OpenCC ``t2s``; return (text, characters changed)."""
    out = _t2s_converter().convert(text)
    if len(out) == len(text):
        changed = sum(a != b for a, b in zip(text, out))
    else:  # phrase tables may change length; count the length change plus differing prefix
        changed = abs(len(out) - len(text)) + sum(a != b for a, b in zip(text, out))
    return out, changed


def normalise_whitespace(text: str, max_blank_lines: int) -> str:
    """Strip trailing spaces, collapse inner runs of spaces/tabs, cap blank lines, strip the ends."""
    text = _TRAILING_SPACE_RE.sub("", text)
    text = _INNER_SPACE_RE.sub(" ", text)
    text = re.sub("\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)
    return text.strip()


def normalise_counted(text: str, lang: str, cfg: CleanConfig, counts: dict[str, int] | None = None) -> str:
    """Normalise ``text`` as the module docstring describes; add counters to ``counts`` if given.

    Counters: ``normalise/control_chars_removed``, ``normalise/t2s_chars_changed``,
    ``normalise/punctuation_widened``, ``normalise/docs_changed``.
    """
    zh = is_zh(lang)
    out = _LINE_BREAKS_RE.sub("\n", text)
    out, removed = remove_control(out)
    if cfg.nfkc:
        out = nfkc(out, keep_cjk_punctuation=cfg.keep_cjk_punctuation and zh)
    t2s_changed = widened = 0
    if cfg.t2s and zh:
        out, t2s_changed = to_simplified(out)
    if cfg.keep_cjk_punctuation and zh:
        out, widened = fullwidth_after_han(out)
    out = normalise_whitespace(out, cfg.max_blank_lines)
    if counts is not None:
        counts["normalise/control_chars_removed"] = counts.get("normalise/control_chars_removed", 0) + removed
        counts["normalise/t2s_chars_changed"] = counts.get("normalise/t2s_chars_changed", 0) + t2s_changed
        counts["normalise/punctuation_widened"] = counts.get("normalise/punctuation_widened", 0) + widened
        counts["normalise/docs_changed"] = counts.get("normalise/docs_changed", 0) + int(out != text)
    return out
