"""Rule filters of the clean stage: each check is a pure function returning a drop reason or None.

Reasons are ``clean_<why>`` strings; a threshold set to None turns its check off. The checks follow
Gopher (Rae et al. 2021, appendix A) and datatrove's Gopher filters, adapted to Chinese:

* Chinese has no spaces, so repetition is measured over *units* that are single Han characters
  (plus runs of Latin letters/digits as one unit each, so the code inside zh_web documents is
  counted by identifier, not by letter); English uses words. Character n-grams are much shorter
  than word n-grams and classical poetry repeats characters by design (parallel couplets, refrains),
  so the Chinese thresholds are separate and looser; they were chosen on the demo corpus (see
  ``CleanConfig``).
* ``min_cjk_ratio`` counts Han characters among non-whitespace characters, so a "Chinese" document
  that is really an English page or a code dump is dropped, while a tutorial whose code blocks sit
  between Chinese paragraphs is kept.
* Placeholders (``□`` lacunae, U+FFFD replacement characters) mark text that is missing; a document
  full of them teaches the model to emit them.
* Mean word length (Gopher: 3-10 characters), for languages written with spaces only: a 100,000-
  character "word" (a base64 blob, a run of one letter) or a text of single letters is not prose.
  Words are ``\\w+`` runs, as in the repetition checks; English prose sits at 3.6-5.3 (demo corpus
  and the shared Gutenberg text, 1,378 kept documents).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterator, Sequence

from cptflow.data.normalise import HAN

from cptflow.data.clean_config import DUP_NGRAM_NS, TOP_NGRAM_NS, CleanConfig

_HAN_RE = re.compile(f"[{HAN}]")
_ZH_UNITS_RE = re.compile(f"[{HAN}]|[^\\W{HAN}]+")
_WORDS_RE = re.compile(r"\w+")


def char_shares(text: str, placeholder_chars: str) -> dict[str, float]:
    """Shares among non-whitespace characters: ``cjk`` (Han), ``symbol`` (Unicode S*), ``digit``
    (Nd), ``placeholder``. Counted over distinct characters, so a long document costs one Counter."""
    counts = Counter(text)
    total = cjk = symbol = digit = placeholder = 0
    for ch, n in counts.items():
        if ch.isspace():
            continue
        total += n
        cat = unicodedata.category(ch)
        if _HAN_RE.match(ch):
            cjk += n
        elif cat[0] == "S":
            symbol += n
        elif cat == "Nd":
            digit += n
        if ch in placeholder_chars:
            placeholder += n
    if total == 0:
        return {"cjk": 0.0, "symbol": 0.0, "digit": 0.0, "placeholder": 0.0}
    return {"cjk": cjk / total, "symbol": symbol / total, "digit": digit / total, "placeholder": placeholder / total}


def units(text: str, zh: bool) -> list[str]:
    """Repetition units: Han characters (and Latin/digit runs) for Chinese, words otherwise."""
    return (_ZH_UNITS_RE if zh else _WORDS_RE).findall(text)


def dup_line_fractions(text: str) -> tuple[float, float]:
    """(share of lines that repeat an earlier line, share of characters in those lines).

    Only lines with at least one letter/digit/Han character count: code fences and lone braces
    (```, ``}``) repeat in every tutorial and say nothing about boilerplate.
    """
    seen: set[str] = set()
    n_lines = n_dup = chars = dup_chars = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line or not _WORDS_RE.search(line):
            continue
        n_lines += 1
        chars += len(line)
        if line in seen:
            n_dup += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    if n_lines == 0:
        return 0.0, 0.0
    return n_dup / n_lines, dup_chars / chars


def _ngrams(us: Sequence[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(us[k:] for k in range(n)))


def top_ngram_fraction(us: Sequence[str], n: int) -> float:
    """Share of unit characters covered by the most frequent n-gram (if it occurs more than once)."""
    total = sum(map(len, us))
    if total == 0 or len(us) < n:
        return 0.0
    gram, count = Counter(_ngrams(us, n)).most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / total


def dup_ngram_fraction(us: Sequence[str], n: int) -> float:
    """Share of unit characters inside n-grams that already occurred earlier in the document.

    Never larger for n + 1 than for n (a repeated (n+1)-gram contains repeated n-grams), which
    ``check_repetition`` uses to skip the longer n when the shortest is already under every limit.
    """
    total = sum(map(len, us))
    if total == 0 or len(us) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(us))
    for i, gram in enumerate(_ngrams(us, n)):
        if gram in seen:
            covered[i : i + n] = b"\x01" * n
        else:
            seen.add(gram)
    return sum(len(u) for u, c in zip(us, covered) if c) / total


def _over(value: float, limit: float | None) -> bool:
    return limit is not None and value > limit


def check_length(text: str, cfg: CleanConfig) -> str | None:
    n = len(text)
    if n == 0:
        return "clean_empty"
    if cfg.min_chars is not None and n < cfg.min_chars:
        return "clean_too_short"
    if cfg.max_chars is not None and n > cfg.max_chars:
        return "clean_too_long"
    return None


def check_chars(text: str, zh: bool, cfg: CleanConfig) -> str | None:
    shares = char_shares(text, cfg.placeholder_chars)
    if zh and cfg.min_cjk_ratio is not None and shares["cjk"] < cfg.min_cjk_ratio:
        return "clean_low_cjk"
    if _over(shares["placeholder"], cfg.max_placeholder_ratio):
        return "clean_placeholders"
    if _over(shares["symbol"], cfg.max_symbol_ratio):
        return "clean_too_many_symbols"
    if _over(shares["digit"], cfg.max_digit_ratio):
        return "clean_too_many_digits"
    return None


def mean_word_chars(text: str) -> float:
    """Mean length of the ``\\w+`` words of ``text`` (0.0 without any)."""
    words = _WORDS_RE.findall(text)
    return sum(map(len, words)) / len(words) if words else 0.0


def check_words(text: str, zh: bool, cfg: CleanConfig) -> str | None:
    if zh or (cfg.min_mean_word_chars is None and cfg.max_mean_word_chars is None):
        return None
    mean = mean_word_chars(text)
    if (cfg.min_mean_word_chars is not None and mean < cfg.min_mean_word_chars) or _over(mean, cfg.max_mean_word_chars):
        return "clean_mean_word_length"
    return None


def check_repetition(text: str, zh: bool, cfg: CleanConfig) -> str | None:
    lines, line_chars = dup_line_fractions(text)
    if _over(lines, cfg.max_dup_line_fraction):
        return "clean_dup_lines"
    if _over(line_chars, cfg.max_dup_line_char_fraction):
        return "clean_dup_line_chars"
    top = cfg.max_top_ngram_fraction_zh if zh else cfg.max_top_ngram_fraction
    dup = cfg.max_dup_ngram_fraction_zh if zh else cfg.max_dup_ngram_fraction
    if not any(x is not None for x in (*top, *dup)):
        return None
    us = units(text, zh)
    for n, limit in zip(TOP_NGRAM_NS, top):
        if limit is not None and top_ngram_fraction(us, n) > limit:
            return "clean_top_ngram"
    limits = [(n, limit) for n, limit in zip(DUP_NGRAM_NS, dup) if limit is not None]
    if limits and dup_ngram_fraction(us, DUP_NGRAM_NS[0]) <= min(limit for _, limit in limits):
        return None  # the fraction only falls with n: no longer n-gram can exceed its limit
    for n, limit in limits:
        if dup_ngram_fraction(us, n) > limit:
            return "clean_dup_ngram"
    return None


def check_blocklist(text: str, blocklist: re.Pattern[str] | None, max_hits: int) -> str | None:
    if blocklist is None:
        return None
    hits = 0
    for _ in blocklist.finditer(text):
        hits += 1
        if hits > max_hits:
            return "clean_blocklist"
    return None


def filter_reason(text: str, zh: bool, cfg: CleanConfig) -> str | None:
    """The first failing check's reason, or None to keep the document.

    Cheap character and word-length checks first, then the blocklist (its reason is the most specific), then the
    repetition statistics, which cost the most.
    """
    return (
        check_length(text, cfg)
        or check_chars(text, zh, cfg)
        or check_words(text, zh, cfg)
        or check_blocklist(text, cfg.blocklist_regex, cfg.max_blocklist_hits)
        or check_repetition(text, zh, cfg)
    )
