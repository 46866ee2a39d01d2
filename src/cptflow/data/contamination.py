"""Matching documents against benchmark questions by long n-grams: the pure core of decontamination.

Matching (GPT-3 style long n-gram overlap, on ``dedup.minhash.normalise_for_hash`` text, so full-width
vs half-width punctuation, spacing and case never hide a copy):

* units are characters for benchmarks in languages written without spaces (Chinese: after
  normalisation whitespace and punctuation are gone) and words otherwise (English);
* a question (stem) of at least ``ngram_chars`` / ``ngram_words`` units is indexed by all its
  n-grams: a document sharing ANY one of them is dropped;
* a shorter question is matched whole (the document contains the complete normalised question) if
  it has at least ``min_chars`` / ``min_words`` units. Below that it is not protected: stems like
  "羊的妊娠期是" (6 chars) or "Primary data are:" occur in ordinary text, and dropping every
  document that contains them would cost real data for no honesty gain. Such questions are counted
  (``questions_unprotected``) and listed in the index manifest;
* with ``include_options``, answer options of at least n units are indexed by their n-grams too.

Every document is checked against both kinds of index (a Chinese page can quote an English question).
The defaults: 13 words (GPT-3, LLaMA); 20 characters for Chinese — a Chinese character carries about
1.5 English words of content, and C-Eval/CMMLU stems have a median of 21-42 characters in the demo
slices, so most stems are matched by n-grams and the rest (10-19 characters) whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cptflow.core.config import to_dict
from cptflow.core.stats import Stats
from cptflow.data.minhash import multipliers, normalised_forms, unit_hashes, window_hashes, is_char_lang
from cptflow.eval.benchmarks import Question


SEED = 0xDEC0  # seeds the n-gram hashes; stored in the index, fixed so indexes stay comparable


@dataclass(frozen=True)
class DecontaminateConfig:
    """Settings of decontamination (config section ``decontaminate:``)."""

    benchmarks: list[Any] = field(default_factory=list)  # names from the top-level benchmarks list; [] = all
    splits: list[str] = field(default_factory=lambda: ["dev", "val", "test"])  # protected splits (those present)
    ngram_words: int = 13  # English: a shared 13-word sequence is a copy, not chance (GPT-3's choice)
    ngram_chars: int = 20  # Chinese: ~13 English words of content; below the median C-Eval/CMMLU stem
    min_words: int = 8  # shorter word-unit questions are too generic to match whole ("Primary data are:")
    min_chars: int = 10  # shorter char-unit questions are too generic to match whole ("羊的妊娠期是")
    include_options: bool = True  # also index the n-grams of answer options at least n units long

    def __post_init__(self) -> None:
        for name in ("ngram_words", "ngram_chars", "min_words", "min_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"decontaminate.{name} must be >= 1")
        if self.min_words > self.ngram_words or self.min_chars > self.ngram_chars:
            raise ValueError("decontaminate: min_words/min_chars cannot exceed ngram_words/ngram_chars")
        if not self.splits:
            raise ValueError("decontaminate.splits must name at least one split")

    def match_params(self) -> dict[str, Any]:
        """The settings an index depends on (apply checks its index against them)."""
        d = to_dict(self)
        d.pop("benchmarks")
        return d | {"seed": SEED}


def _doc_units(text: str) -> dict[str, np.ndarray]:
    """Unit hashes of a text as characters (unspaced-language form) and as words, normalising once."""
    char_form, word_form = normalised_forms(text)
    return {"char": unit_hashes(char_form, True, SEED), "word": unit_hashes(word_form, False, SEED)}


def _units(text: str, kind: str) -> np.ndarray:
    char_form, word_form = normalised_forms(text)
    return unit_hashes(char_form, True, SEED) if kind == "char" else unit_hashes(word_form, False, SEED)


def question_keys(q: Question, kind: str, cfg: DecontaminateConfig, mult: np.ndarray) -> tuple[np.ndarray, str, int]:
    """Hashed keys of one question, how it is protected ("ngram", "whole", "unprotected"), stem units."""
    n, lo = (cfg.ngram_chars, cfg.min_chars) if kind == "char" else (cfg.ngram_words, cfg.min_words)
    units = _units(q.question, kind)
    keys = []
    if len(units) >= n:
        how = "ngram"
        keys.append(window_hashes(units, [n], mult)[n])
    elif len(units) >= lo:
        how = "whole"
        keys.append(window_hashes(units, [len(units)], mult)[len(units)])
    else:
        how = "unprotected"
    if cfg.include_options:
        for opt in q.options:
            u = _units(opt, kind)
            if len(u) >= n:
                keys.append(window_hashes(u, [n], mult)[n])
    return (np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)), how, len(units)


def build_index(questions: Iterable[tuple[Question, str]], cfg: DecontaminateConfig,
                stats: Stats | None = None) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """Index arrays from (question, benchmark language) pairs, and the unprotected questions (pure)."""
    stats = stats if stats is not None else Stats()
    mult = multipliers(SEED, max(cfg.ngram_chars, cfg.ngram_words))
    meta: dict[str, list[str]] = {"benchmark": [], "subject": [], "split": [], "qid": []}
    found: dict[str, list[tuple[np.ndarray, int]]] = {"char": [], "word": []}
    lengths: dict[str, set[int]] = {"char": {cfg.ngram_chars}, "word": {cfg.ngram_words}}
    unprotected = []
    for row, (q, lang) in enumerate(questions):
        kind = "char" if is_char_lang(lang) else "word"
        keys, how, n_units = question_keys(q, kind, cfg, mult)
        for k, v in (("benchmark", q.benchmark), ("subject", q.subject), ("split", q.split), ("qid", q.qid)):
            meta[k].append(v)
        stats.update(f"questions/{q.benchmark}/{q.split}")
        stats.update(f"questions_{how}")
        if how == "whole":
            lengths[kind].add(n_units)
        elif how == "unprotected":
            unprotected.append({"benchmark": q.benchmark, "subject": q.subject, "split": q.split, "qid": q.qid})
        found[kind].append((keys, row))
    arrays: dict[str, np.ndarray] = {k: np.array(v, dtype=str) for k, v in meta.items()}
    for kind, items in found.items():
        keys = np.concatenate([k for k, _ in items]) if items else np.empty(0, dtype=np.uint64)
        rows = np.concatenate([np.full(len(k), r, dtype=np.int64) for k, r in items]) if items else np.empty(0, np.int64)
        order = np.lexsort((rows, keys))  # by key, then lowest question row first
        keys, rows = keys[order], rows[order]
        first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.empty(0, dtype=bool)
        arrays[f"{kind}_keys"], arrays[f"{kind}_rows"] = keys[first], rows[first]
        arrays[f"{kind}_lengths"] = np.array(sorted(lengths[kind]), dtype=np.int64)
        stats.update(f"keys/{kind}", int(first.sum()))
    arrays["params"] = np.array(json.dumps(cfg.match_params(), sort_keys=True))
    return arrays, unprotected


def prepare_lookup(index: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per unit kind: sorted keys, their rows, window lengths, and a bit-table prefilter.

    ``searchsorted`` of every window of every document dominated the run time (random access into
    the key array); a boolean table indexed by the low hash bits rejects ~95% of windows first.
    """
    out = {}
    for kind in ("char", "word"):
        keys = index[f"{kind}_keys"]
        if not len(keys):
            continue
        size = 1 << int(min(27, max(16, np.ceil(np.log2(16 * len(keys))))))
        table = np.zeros(size, dtype=bool)
        table[(keys & np.uint64(size - 1)).astype(np.int64)] = True
        out[kind] = {"keys": keys, "rows": index[f"{kind}_rows"], "lengths": index[f"{kind}_lengths"].tolist(),
                     "table": table, "mask": np.uint64(size - 1)}
    return out


def find_match(text: str, lookup: dict[str, dict[str, Any]], mult: np.ndarray) -> int | None:
    """Row of the question whose key occurs earliest in ``text`` (ties: lowest row), or None (pure)."""
    best: tuple[int, int] | None = None
    units = _doc_units(text)
    for kind, lk in lookup.items():
        keys = lk["keys"]
        for h in window_hashes(units[kind], lk["lengths"], mult).values():
            maybe = np.flatnonzero(lk["table"][(h & lk["mask"]).astype(np.int64)])
            if not len(maybe):
                continue
            pos = np.minimum(np.searchsorted(keys, h[maybe]), len(keys) - 1)
            hit = np.flatnonzero(keys[pos] == h[maybe])
            if len(hit):
                cand = (int(maybe[hit[0]]), int(lk["rows"][pos[hit[0]]]))
                best = cand if best is None or cand < best else best
    return None if best is None else best[1]
