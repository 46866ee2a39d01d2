"""Clean stage: normalise every document, then drop the ones that fail a rule filter.

Input and output are intermediate-format JSONL (``{"id", "text", "source", "category", "lang"}``,
as ``cptflow.ingest`` writes it). Kept documents carry the normalised text; dropped documents go to
a separate JSONL with their text *as it came in* plus ``"reason"``, so a person auditing the drops
sees what the source really held. Normalisation lives in ``cptflow.normalise``, the checks in
``cptflow.filters``; this module holds the config, the per-document function and the file I/O.

The default thresholds were measured on the demo corpus (workflow/resources/demo/corpus): they keep
the classical poems (complete works go down to 10 characters), the zh_web tutorials with
their code blocks, and the English prose, and they drop the Project Gutenberg licence boilerplate
and the lacuna-ridden records of the upstream ``error`` files. ``tests/test_clean.py`` pins the
per-file drop counts.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from cptflow.cli import stage_main
from cptflow.config import ConfigError, from_dict, to_dict
from cptflow.filters import DUP_NGRAM_NS, TOP_NGRAM_NS, compile_blocklist, filter_reason
from cptflow.io import PathLike, atomic_path, dumps_record, iter_jsonl
from cptflow.normalise import is_zh, normalise_counted
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
log = logging.getLogger("cptflow.clean")

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

    # --- normalisation (cptflow.normalise) ---
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


def normalise_text(text: str, lang: str, cfg: CleanConfig) -> str:
    """The normalised text (see ``cptflow.normalise`` for the steps and why)."""
    return normalise_counted(text, lang, cfg)


def clean_document(
    text: str, lang: str, cfg: CleanConfig, counts: dict[str, int] | None = None
) -> tuple[str, str | None]:
    """Normalise ``text`` and run the filters on the result: (normalised text, drop reason or None)."""
    out = normalise_counted(text, lang, cfg, counts)
    return out, filter_reason(out, is_zh(lang), cfg)


def run(cfg: CleanConfig, input_path: PathLike, output: PathLike, dropped: PathLike) -> Stats:
    """Clean one intermediate JSONL file; write kept and dropped documents (atomically)."""
    stats = Stats()
    counts: dict[str, int] = {}
    with atomic_path(output) as tmp_out, atomic_path(dropped) as tmp_drop:
        with open(tmp_out, "w", encoding="utf-8") as fo, open(tmp_drop, "w", encoding="utf-8") as fd:
            for lineno, rec in enumerate(iter_jsonl(input_path), 1):
                text, lang = rec.get("text"), rec.get("lang")
                if not isinstance(text, str) or not isinstance(lang, str):
                    raise ValueError(f"{input_path}:{lineno}: record needs string 'text' and 'lang' (ingest output)")
                stats.update("docs_in")
                stats.update("chars_in", len(text))
                new, reason = clean_document(text, lang, cfg, counts)
                if reason is None:
                    out = dict(rec)
                    out["text"] = new
                    fo.write(dumps_record(out) + "\n")
                    stats.update("docs_out")
                    stats.update("chars_out", len(new))
                else:
                    fd.write(dumps_record({**rec, "reason": reason}) + "\n")
                    stats.drop(reason, len(text))
    for k in sorted(counts):
        stats.update(k, counts[k])
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="intermediate JSONL (from ingest)")
    p.add_argument("--output", required=True, help="kept documents, normalised (JSONL)")
    p.add_argument("--dropped", required=True, help="dropped documents as they came in, plus 'reason' (JSONL)")
    p.add_argument("--stats", required=True, help="provenance manifest (JSON)")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(CleanConfig, params, "clean")
    with Timer() as t:
        stats = run(cfg, args.input, args.output, args.dropped)
    files = [*cfg.blocklist_word_files, *cfg.blocklist_pattern_files]
    write_manifest(
        args.stats, stage="clean", version=VERSION, params=to_dict(cfg), inputs=[args.input, *files],
        stats=stats, seconds=t.seconds, outputs=[args.output, args.dropped],
    )
    dropped = {k[len("dropped/"):]: v for k, v in stats.to_dict().items() if k.startswith("dropped/")}
    log.info("%s: %d in, %d kept, dropped %s", args.input, stats["docs_in"], stats["docs_out"], dropped)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("clean", argv, _build, _run, "Normalise documents and drop those failing rule filters.")


if __name__ == "__main__":
    sys.exit(main())
