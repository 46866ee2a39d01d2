"""Settings of the clean stage (config section ``clean:``), shared by normalisation, the filters and the stage.

Kept apart from ``cptflow.data.clean`` so that ``normalise`` and ``filters`` can take the config
without importing the stage that imports them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cptflow.core.config import ConfigError
from cptflow.data.blocklist import compile_blocklist

TOP_NGRAM_NS = (2, 3, 4)  # max_top_ngram_* lists are indexed by these n
DUP_NGRAM_NS = (5, 6, 7, 8, 9, 10)  # max_dup_ngram_* lists are indexed by these n

# Project Gutenberg licence/header/footer phrases (checked on the demo en corpus and the shared
# en_gutenberg.jsonl: they occur only in the boilerplate, never in the books' prose). ``\s+`` because
# the licence is hard-wrapped and "Project\nGutenberg" is common.
GUTENBERG_PATTERNS = (
    r"\*{3}\s*(?:start|end)\s+of\s+(?:the|this)\s+project\s+gutenberg",
    r"project\s+gutenberg(?:-tm|\s+literary\s+archive|\s+licen[cs]e|\s+e-?text|\s+e-?book)",
    r"gutenberg\.(?:org|net)",
    r"\bpglaf\b",
)


@dataclass(frozen=True)
class CleanConfig:
    """Settings of the clean stage (config section ``clean:``). Every default was measured on the
    demo corpus and on the project's larger shared corpora (numbers in the comments)."""

    # --- normalisation (cptflow.data.normalise) ---
    nfkc: bool = True  # fold compatibility forms (full-width Latin/digits, ligatures, NBSP)
    keep_cjk_punctuation: bool = True  # zh: ，：；！？（）～… survive NFKC; ASCII ,:;!? after Han widen
    t2s: bool = False  # zh only: traditional → simplified (OpenCC t2s); lossy (后/後, 发/髮), so opt-in
    max_blank_lines: int = 2  # longer runs of blank lines collapse to this many
    # --- length, characters ---
    min_chars: int | None = 10  # complete classical works go down to 10 chars (幽梦影); bare headings are 2-4
    max_chars: int | None = 200_000  # longer is a dump, not a document; repetition checks are O(chars)
    min_cjk_ratio: float | None = 0.05  # zh only: Han share of non-space chars; zh_web tutorials go down to 0.059
    max_placeholder_ratio: float | None = 0.02  # placeholder_chars share; 1-2 lacunae in a poem are kept
    placeholder_chars: str = "□\ufffd"  # □ marks missing characters in the poetry sources, U+FFFD bad bytes
    max_symbol_ratio: float | None = 0.35  # Unicode S* (math, currency, modifiers); code tutorials reach 0.30
    max_digit_ratio: float | None = 0.35  # decimal digits; Wikipedia sport/stat paragraphs reach 0.30
    # --- mean word length (Gopher's 3-10), languages written with spaces only ---
    min_mean_word_chars: float | None = 3.0  # English prose: 3.6-5.3 (demo + shared Gutenberg text)
    max_mean_word_chars: float | None = 10.0  # one 100,000-character "word" is not prose
    # --- repetition (Gopher); English uses words, Chinese characters ---
    max_dup_line_fraction: float | None = 0.60  # lines repeating an earlier line; Gopher's 0.30 drops
    # Shakespeare dialogue (speaker lines, 0.40), Song ci refrains and code listings (0.56)
    max_dup_line_char_fraction: float | None = 0.45  # characters in such lines; good text reaches 0.42
    max_top_ngram_fraction: tuple[float | None, ...] = (0.20, 0.18, 0.16)  # word n=2,3,4 (Gopher)
    max_dup_ngram_fraction: tuple[float | None, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # word n=5..10
    # Chinese character n-grams: short aphorisms reach 0.48/0.60/0.67 on n=2/3/4 by parallelism
    max_top_ngram_fraction_zh: tuple[float | None, ...] = (0.50, 0.65, 0.70)
    # Shijing stanzas and code listings reach 0.68 at n=5 but at most 0.45 at n=10, while text
    # copied three times covers 0.67 at every n: the limit falls with n
    max_dup_ngram_fraction_zh: tuple[float | None, ...] = (0.75, 0.72, 0.68, 0.62, 0.56, 0.50)
    # --- blocklist (sensitive topics, boilerplate) ---
    blocklist_words: tuple[str, ...] = ()  # whole-word for ASCII words, substring for Chinese; case-insensitive
    blocklist_patterns: tuple[str, ...] = GUTENBERG_PATTERNS  # Python regexes, case-insensitive
    blocklist_word_files: tuple[str, ...] = ()  # files of one word per line (# comments, blank lines skipped)
    blocklist_pattern_files: tuple[str, ...] = ()  # files of one regex per line
    max_blocklist_hits: int = 2  # more matches than this drop the document; 2 keeps a book chunk
    # that merely ends with "End of Project Gutenberg Etext", while licence chunks have 3-15

    def __post_init__(self) -> None:
        for name, ns in (
            ("max_top_ngram_fraction", TOP_NGRAM_NS),
            ("max_top_ngram_fraction_zh", TOP_NGRAM_NS),
            ("max_dup_ngram_fraction", DUP_NGRAM_NS),
            ("max_dup_ngram_fraction_zh", DUP_NGRAM_NS),
        ):
            value = tuple(getattr(self, name))
            if len(value) != len(ns):
                raise ConfigError(f"clean.{name}: needs {len(ns)} values (n = {ns[0]}..{ns[-1]}), got {len(value)}")
            object.__setattr__(self, name, value)
        for name in ("blocklist_words", "blocklist_patterns", "blocklist_word_files", "blocklist_pattern_files"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.min_chars is not None and self.max_chars is not None and self.min_chars > self.max_chars:
            raise ConfigError(f"clean: min_chars {self.min_chars} > max_chars {self.max_chars}")
        lo, hi = self.min_mean_word_chars, self.max_mean_word_chars
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"clean: min_mean_word_chars {lo} > max_mean_word_chars {hi}")
        if self.max_blank_lines < 0 or self.max_blocklist_hits < 0:
            raise ConfigError("clean: max_blank_lines and max_blocklist_hits must be >= 0")
        words = [*self.blocklist_words, *_read_entries(self.blocklist_word_files, "blocklist_word_files")]
        patterns = [*self.blocklist_patterns, *_read_entries(self.blocklist_pattern_files, "blocklist_pattern_files")]
        # Compiled once here (config is built once per run); not a dataclass field, so it stays out
        # of equality, to_dict and the manifest.
        object.__setattr__(self, "blocklist_regex", compile_blocklist(words, patterns, "clean"))

    # Set per instance in __post_init__; a ClassVar is not a dataclass field, so it is no config key.
    blocklist_regex: ClassVar[re.Pattern[str] | None] = None


def _read_entries(paths: Sequence[str], field: str) -> list[str]:
    out: list[str] = []
    for p in paths:
        try:
            lines = Path(p).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"clean.{field}: cannot read {p}: {e}") from e
        out += [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    return out
