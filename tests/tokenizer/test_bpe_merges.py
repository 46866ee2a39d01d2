"""Continued BPE learning: the incremental learner equals a naive re-count, and the CJK rule is exact."""

from __future__ import annotations

import json
import random
from itertools import pairwise

import pytest
from conftest import REPO

from cptflow.tokenizer import bpe_merges as bm

SMOL = REPO / "workflow" / "resources" / "smollm2" / "tokenizer"


def test_byte_alphabet_is_the_one_the_real_vocabulary_uses():
    enc, dec = bm.byte_alphabet()
    assert len(enc) == len(dec) == 256
    assert all(bm.token_bytes(bm.bytes_token(bytes([b]))) == bytes([b]) for b in range(256))
    vocab = json.loads((SMOL / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert bm.token_bytes("Ġthe") == b" the" and "Ġthe" in vocab
    assert bm.token_bytes("ä¸Ń").decode() == "中"
    singles = [t for t in vocab if len(t) == 1]
    assert len(singles) > 200 and all(t in dec for t in singles)  # every 1-char token is a byte of the map


@pytest.mark.parametrize("text,cut,want", [
    ("中", None, True), ("中", 2, True), ("中", 1, True),  # E4 leads only U+4000-4FFF: CJK or hexagrams
    ("龘", 2, True),  # E9 BE: U+9F80-9FBF, all Han
    ("a中", 3, True), ("。", 2, True), ("가", 2, True),  # a Hangul syllable start (EA B0)
    ("ก", 2, False),  # Thai
    ("ㄱ", 1, False),  # E3 also leads Hangul jamo U+3130-318F: not every completion is CJK
    ("가", 1, False),  # EA also leads Yi syllables
    ("abc", None, False), ("é", None, False),
])
def test_implies_cjk_only_when_every_text_with_it_has_cjk(text, cut, want):
    data = text.encode() if cut is None else text.encode()[:cut]
    assert bm.implies_cjk(data) is want


def test_a_suffix_of_a_character_implies_nothing():
    assert not bm.implies_cjk("龘".encode()[1:])  # BE 98 also ends e.g. U+0F98 (Tibetan)
    assert bm.implies_cjk("龘".encode()[1:] + "中".encode())  # a whole CJK character after it


def test_char_count_counts_characters_touched():
    assert bm.char_count("中文".encode()) == 2 and bm.char_count("中文".encode()[1:5]) == 1 and bm.char_count(b"ab") == 2


def naive(words, vocab_bytes, first_id, max_merges, min_count, allowed, alone):
    """Reference: re-count every pair of every word before each merge (what the learner avoids)."""
    words = [(list(w), n) for w, n in words]
    vocab_bytes, seen, banned = dict(vocab_bytes), set(vocab_bytes.values()), set()
    merges, ranks, new = [], {}, first_id
    while len(merges) < max_merges:
        counts = {}
        for w, n in words:
            for p in pairwise(w):
                b = vocab_bytes[p[0]] + vocab_bytes[p[1]]
                if p not in banned and b not in seen and allowed(b):
                    counts[p] = counts.get(p, 0) + n
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < min_count:
            break
        b = vocab_bytes[pair[0]] + vocab_bytes[pair[1]]
        ranks[pair] = (len(merges), new)
        if alone(b) is None or bm._bpe_apply(alone(b), ranks) != [new]:
            del ranks[pair]
            banned.add(pair)
            continue
        vocab_bytes[new], merges = b, merges + [(*pair, new)]
        seen.add(b)
        words = [(bm._bpe_apply(w, {pair: (0, new)}), n) for w, n in words]
        new += 1
    return merges


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_learner_equals_naive_recount(seed):
    rng = random.Random(seed)
    letters = b"abcd"
    vocab_bytes = {i: bytes([c]) for i, c in enumerate(letters)}
    words = [([rng.randrange(4) for _ in range(rng.randint(1, 12))], rng.randint(1, 5)) for _ in range(300)]
    words += [([0, 0, 0, 0, 0, 0, 0], 7), ([1, 2, 1, 2, 1, 2], 4)]  # runs: overlapping occurrences

    def alone(b):  # "dd" stands for a token whose text the pre-tokenizer would split: never reachable
        return None if b == b"dd" else [letters.index(c) for c in b]

    def allowed(b):
        return len(b) <= 6 and b != b"ab"  # a rule that refuses one pair, like the CJK rule would

    got = bm.learn_merges(words, dict(vocab_bytes), 10, max_merges=60, min_count=2, allowed=allowed,
                       segment_alone=alone)
    want = naive(words, vocab_bytes, 10, 60, 2, allowed, alone)
    assert got.merges == want
    assert len(want) >= 30  # the test exercises many merges, not a trivial prefix
    assert got.skipped == {"unreachable": 1} and not any(vocab_bytes.get(c) == b"dd" for *_, c in got.merges)


def test_learner_stops_at_min_count_and_is_deterministic():
    words = [([0, 1], 5), ([1, 2], 2), ([2, 3], 1)]
    vb = {0: b"w", 1: b"x", 2: b"y", 3: b"z"}
    kw = {"max_merges": 10, "allowed": lambda b: True, "segment_alone": lambda b: [b"wxyz".index(c) for c in b]}
    out = bm.learn_merges(words, dict(vb), 4, min_count=2, **kw)
    assert out.merges == [(0, 1, 4), (1, 2, 5)] and out.last_count == 2
    assert bm.learn_merges(words, dict(vb), 4, min_count=2, **kw).merges == out.merges
    assert bm.learn_merges(words, dict(vb), 4, min_count=1, **kw).merges[-1] == (2, 3, 6)
