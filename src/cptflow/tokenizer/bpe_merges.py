"""Continued BPE merge learning on top of a byte-level BPE base ("Teaching Old Tokenizers New Words").

The base's merges are kept as they are; new merges are learned from the target-language text *as the
base segments it*, and ranked after every base merge. A Hugging Face BPE model always applies the
lowest-ranked applicable merge first, so on any text it first reproduces the base segmentation, then
applies new merges on top: new tokens only ever join whole base tokens, base ids never move, and text
where no new merge applies encodes to exactly the base ids.

What makes that hold, and why each rule is here:

* **Words are the base's own pre-tokens** (its normaliser and pre-tokeniser, run by ``tokenizers``), each
  segmented by the base BPE itself, so the learner starts from the segmentation the model was trained on.
* **A pair whose result already exists is never merged** (a base token reached by another path, or a
  new token): a second merge into an existing id would let a base merge fire after a new one.
* **With ``require_cjk`` a merge is allowed only if every text containing its result contains a CJK
  character** (``implies_cjk``): so English, code and every other script keep their base ids by
  construction, not by luck. A byte-level token may end inside a character (``E9 BE`` of 龘); such a
  fragment qualifies when every character starting with those bytes is CJK.
* **Every accepted merge is reachable**: encoding the new token's bytes alone with the merges so far
  gives that token alone, and when the bytes are whole characters, so does encoding its text. For the
  bytes this follows from BPE itself (no merge ever crossed the token's edges where it was formed, so
  without neighbours the same merges happen); it is checked anyway. The text can fail where the
  pre-tokeniser or normaliser treats the token's text on its own differently; such a pair is banned,
  since a token that text never produces on its own is the unreachable kind the audit reports.

The learner keeps all words in one linked array with per-pair position lists, so a merge touches only
the occurrences of its pair (as SentencePiece's and ``tokenizers``' trainers do), and a lazy max-heap
of pair counts: learning costs about the number of symbols in the distinct training words, not a scan
per merge.
"""

from __future__ import annotations

import heapq
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise

from cptflow.tokenizer.sp_merge import has_cjk

# Code-point ranges counted as CJK for byte fragments: ``has_cjk``'s scripts plus the Yijing hexagram
# symbols (U+4DC0-4DFF), which sit between Han extension A and the unified ideographs, so that a token
# ending in the lead byte E4 (U+4000-4FFF) qualifies.
_CJK_SPANS = ((0x3000, 0x303F), (0x3040, 0x30FF), (0x3100, 0x312F), (0x31A0, 0x31FF), (0x3400, 0x9FFF),
              (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0xFE30, 0xFE4F), (0xFF00, 0xFFEF), (0x20000, 0x323AF))


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's byte <-> printable character map, which every ByteLevel tokenizer's vocabulary uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    enc = {b: chr(c) for b, c in zip(printable, chars, strict=True)}
    return enc, {c: b for b, c in enc.items()}


def token_bytes(token: str) -> bytes:
    """The bytes a ByteLevel vocabulary entry stands for ("Ġthe" -> b" the")."""
    dec = byte_alphabet()[1]
    return bytes(dec[c] for c in token)


def bytes_token(data: bytes) -> str:
    enc = byte_alphabet()[0]
    return "".join(enc[b] for b in data)


def implies_cjk(data: bytes) -> bool:
    """Whether every text whose UTF-8 contains ``data`` contains a CJK character.

    True when ``data`` holds a whole CJK character, or ends in an incomplete character every completion
    of which is CJK (``E9 BE`` can only start U+9F80-9FBF). Leading continuation bytes could belong to
    a character of any script and count for nothing.
    """
    if has_cjk(data.decode("utf-8", errors="ignore")):
        return True
    i = len(data) - 1
    while i >= 0 and 0x80 <= data[i] <= 0xBF:
        i -= 1
    if i < 0:
        return False
    lead, cont = data[i], data[i + 1 :]
    width = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    if len(cont) >= width - 1:
        return False  # ASCII, an invalid lead byte, or a whole (non-CJK) character
    bits = lead & (0x7F >> width)
    for c in cont:
        bits = (bits << 6) | (c & 0x3F)
    rest = 6 * (width - 1 - len(cont))
    lo, hi = bits << rest, ((bits + 1) << rest) - 1
    return any(a <= lo and hi <= b for a, b in _CJK_SPANS)


def char_count(data: bytes) -> int:
    """Characters a byte string touches: every byte that is not a UTF-8 continuation byte, at least 1."""
    return max(1, sum(not 0x80 <= b <= 0xBF for b in data))


@dataclass
class Learned:
    """New merges in rank order (ids of the pair, id of the result) and why candidates were refused."""

    merges: list[tuple[int, int, int]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    last_count: int = 0  # frequency of the last accepted pair (how far down the tail learning went)


def _bpe_apply(ids: list[int], ranks: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """Apply merges (pair -> (rank, result)) lowest rank first, leftmost first, as tokenizers' BPE does."""
    ids = list(ids)
    while len(ids) > 1:
        best = min(((ranks[p][0], i) for i, p in enumerate(pairwise(ids)) if p in ranks), default=None)
        if best is None:
            break
        i = best[1]
        ids[i : i + 2] = [ranks[(ids[i], ids[i + 1])][1]]
    return ids


def learn_merges(
    words: Iterable[tuple[Sequence[int], int]], vocab_bytes: dict[int, bytes], first_id: int, *,
    max_merges: int, min_count: int, allowed: Callable[[bytes], bool],
    segment_alone: Callable[[bytes], list[int] | None],
) -> Learned:
    """Learn up to ``max_merges`` merges over base-segmented ``words`` (ids, frequency).

    ``vocab_bytes`` maps every id that may appear (base tokens) to its bytes and gains the new tokens;
    new ids start at ``first_id``. ``allowed(bytes)`` says whether a merged token may exist at all
    (script and length rules); ``segment_alone(bytes)`` gives the base ids of a token's bytes encoded on
    their own, or None if its text would not stay one pre-token. Ties are broken by lowest pair ids, so
    the result is deterministic.
    """
    # Flat int32 arrays, not lists: a list costs a pointer plus an int object per symbol (about 10x more).
    sym, nxt, prv, freq = array("i"), array("i"), array("i"), array("q")
    counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], array] = {}
    ok: dict[tuple[int, int], bool] = {}
    seen = {b: i for i, b in vocab_bytes.items()}

    def permitted(pair: tuple[int, int]) -> bool:
        v = ok.get(pair)
        if v is None:
            merged = vocab_bytes[pair[0]] + vocab_bytes[pair[1]]
            v = ok[pair] = merged not in seen and allowed(merged)
        return v

    for ids, n in words:
        if len(ids) < 2:
            continue
        start = len(sym)
        for k, t in enumerate(ids):
            sym.append(t)
            freq.append(n)
            prv.append(start + k - 1 if k else -1)
            nxt.append(start + k + 1 if k + 1 < len(ids) else -1)
        for k in range(len(ids) - 1):
            pair = (ids[k], ids[k + 1])
            if permitted(pair):
                counts[pair] = counts.get(pair, 0) + n
                where.setdefault(pair, array("i")).append(start + k)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    out = Learned()
    ranks: dict[tuple[int, int], tuple[int, int]] = {}
    new_id = first_id

    def skip(reason: str) -> None:
        out.skipped[reason] = out.skipped.get(reason, 0) + 1

    def ban(pair: tuple[int, int]) -> None:
        ok[pair] = False
        counts.pop(pair, None)
        where.pop(pair, None)

    def add(pair: tuple[int, int], n: int, pos: int, touched: set) -> None:
        if permitted(pair):
            counts[pair] = counts.get(pair, 0) + n
            where.setdefault(pair, array("i")).append(pos)
            touched.add(pair)

    def sub(pair: tuple[int, int], n: int) -> None:
        c = counts.get(pair)
        if c is None:
            return
        if c > n:
            counts[pair] = c - n
        else:  # no occurrence left: every position listed for it is stale, free them
            del counts[pair]
            where.pop(pair, None)

    while heap and len(out.merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        c = counts.get(pair, 0)
        if c != -neg:  # stale entry: the count fell since it was pushed
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        if c < min_count:
            break
        a, b = pair
        merged = vocab_bytes[a] + vocab_bytes[b]
        if merged in seen:  # another pair formed the same token meanwhile
            skip("in_vocab")
            ban(pair)
            continue
        alone = segment_alone(merged)
        ranks[pair] = (len(out.merges), new_id)
        if alone is None or _bpe_apply(alone, ranks) != [new_id]:
            del ranks[pair]
            skip("unreachable")
            ban(pair)
            continue
        vocab_bytes[new_id] = merged
        seen[merged] = new_id
        out.merges.append((a, b, new_id))
        out.last_count = c
        touched: set = set()
        for p in sorted(set(where.pop(pair))):
            q = nxt[p]
            if sym[p] != a or q < 0 or sym[q] != b:
                continue  # stale position (already merged away)
            n, left, right = freq[p], prv[p], nxt[q]
            if left >= 0:
                sub((sym[left], a), n)
            if right >= 0:
                sub((b, sym[right]), n)
            sym[p], sym[q] = new_id, -1
            nxt[p] = right
            if right >= 0:
                prv[right] = p
            if left >= 0:
                add((sym[left], new_id), n, left, touched)
            if right >= 0:
                add((new_id, sym[right]), n, p, touched)
        counts.pop(pair, None)
        for t in touched:
            if counts.get(t, 0) > 0:
                heapq.heappush(heap, (-counts[t], t))
        new_id += 1
    return out

