"""The text a new vocabulary trains on: document lines, cut to the trainer's limit, sampled in one pass.

SentencePiece silently skips lines longer than its ``max_sentence_length``; a corpus of terabytes does
not fit in memory. So lines are cut at sentence ends and a seeded sample, bounded both in lines
(``input_sentence_size``) and in characters (``max_sample_chars``), is drawn while streaming the
shards once (``bounded_sample``): the vocab job's memory, and the trainer's, stay flat however large
the corpus grows. Character counts (for ``top_chars``) see all the text.
"""

from __future__ import annotations

import heapq
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence

from cptflow.core.io import PathLike
from cptflow.core.stats import Stats
from cptflow.tokenizer.compression import iter_texts
from cptflow.tokenizer.sp_merge import HAN_RE, has_cjk
from cptflow.tokenizer.vocab_config import VocabConfig


_SENTENCE_END = re.compile(r"(?<=[。！？!?；;…])")


def split_lines(text: str, max_bytes: int) -> list[str]:
    """Training lines of a document: its non-blank lines, long ones cut to ``max_bytes`` UTF-8 bytes.

    SentencePiece silently skips lines over ``max_sentence_length`` bytes; cutting at sentence ends
    keeps that text (a single over-long sentence is cut at character boundaries).
    """
    out: list[str] = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        if len(line.encode("utf-8")) <= max_bytes:
            out.append(line)
            continue
        chunk = ""
        for sent in _SENTENCE_END.split(line):
            for piece in _cut(sent, max_bytes):
                if chunk and len((chunk + piece).encode("utf-8")) > max_bytes:
                    out.append(chunk)
                    chunk = ""
                chunk += piece
        if chunk.strip():
            out.append(chunk)
    return out


def _cut(text: str, max_bytes: int) -> list[str]:
    parts, cur, size = [], [], 0
    for ch in text:
        b = len(ch.encode("utf-8"))
        if size + b > max_bytes:
            parts.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += b
    parts.append("".join(cur))
    return [x for x in parts if x]


def bounded_sample(items: Iterator[str], max_items: int, max_chars: int, rng: random.Random,
                   shuffle: bool = True) -> list[str]:
    """A uniform sample of at most ``max_items`` items and ``max_chars`` characters, in one pass (0 = no bound).

    Every item draws a seeded random key; the sample is exactly the items whose key is below a
    threshold that falls as the budget fills (an item over the budget pops the largest key, which
    becomes the threshold), so memory is the sample itself. Returned in key order (a seeded shuffle),
    or in input order with ``shuffle`` off.
    """
    heap: list[tuple[float, int, str]] = []  # (-key, position, item): the largest key on top
    chars, threshold = 0, 1.0
    for pos, item in enumerate(items):
        key = rng.random()
        if key >= threshold:
            continue
        heapq.heappush(heap, (-key, pos, item))
        chars += len(item)
        while heap and ((max_items and len(heap) > max_items) or (max_chars and chars > max_chars)):
            neg, _, out = heapq.heappop(heap)
            chars -= len(out)
            threshold = -neg
    order = sorted(heap, key=lambda e: -e[0]) if shuffle else sorted(heap, key=lambda e: e[1])
    return [item for _, _, item in order]


def training_lines(
    cfg: VocabConfig, files: Sequence[PathLike], stats: Stats, want_lines: bool = True
) -> tuple[list[str], Counter]:
    """One streaming pass: the seeded, shuffled sample of training lines and Chinese character counts.

    Characters are counted over all the text, not the sample, so ``top_chars`` sees true frequencies
    (and only for the methods that use them: counting is the slow part of a pass).
    """
    rng = random.Random(cfg.seed)
    char_counts: Counter = Counter()
    count_chars = cfg.method in ("top_chars", "both")

    def lines() -> Iterator[str]:
        for path in files:
            for text in iter_texts(path, cfg.lang, stats):
                stats.update("docs_in")
                stats.update("chars_in", len(text))
                if count_chars:
                    char_counts.update(HAN_RE.findall(text))
                if not want_lines:
                    continue
                for line in split_lines(text, cfg.max_sentence_length):
                    stats.update("lines_in")
                    if cfg.require_cjk and not has_cjk(line):
                        stats.update("lines_skipped/no_cjk")
                        continue
                    yield line

    sample = bounded_sample(lines(), cfg.input_sentence_size, cfg.max_sample_chars, rng, cfg.shuffle)
    stats.update("lines_trained", len(sample))
    stats.update("chars_sampled", sum(map(len, sample)))
    if not stats["docs_in"]:
        raise ValueError(f"vocab: no document of lang {cfg.lang!r} in the training text "
                         f"({', '.join(map(str, files)) or 'no files'}): was its category emptied by the data "
                         "stages? The funnel names where its documents went.")
    return sample, char_counts
