"""Appending new pieces to a SentencePiece BPE model without moving any base id, and checking it.

The expanded tokenizer must behave exactly like the base one wherever the base is enough: base ids
never move, special tokens keep their ids, and text with no new characters encodes to the same ids.
Three choices here make that hold, each measured on the demo tokenizer (Mistral-7B v0.3 SentencePiece
BPE, whose 15 whitespace-run pieces carry the sentinel score -1e9):

* New pieces are only appended, each one new, not whitespace or a byte piece, and (``require_cjk``)
  holding a CJK character, so that English and code can never form them.
* New pieces score strictly *below the lowest base score*, in their given order (see
  ``appended_scores``). SentencePiece BPE merges the highest-scoring adjacent pair first, so every base
  merge happens before any new one: the expanded segmentation of any text is the base segmentation
  merged further, never a different split (so a new token's embedding can start from whole base
  tokens). Scoring them 0, as several public recipes do, lets new pieces pre-empt base merges: with
  the demo's default config that re-split base tokens in 17 of the 60 held-out Chinese texts for a
  gain of 0.001 tokens/char (0.8284 vs 0.8293), and with transformers 5's id-ordered merges the fast
  tokenizer then disagreed with sentencepiece on 1801 of 2000 Chinese lines (ENVIRONMENT.md).
* A piece no split of which is two pieces of the merged vocabulary can never be produced by BPE
  (a dead id whose embedding row would never train); it is left out (``unreachable``).

``verify_merge`` re-checks all of this on the finished model and raises ``ValueError`` naming the first
failure, so a bad merge stops the run instead of reaching training. The Hugging Face form is built
from the proto itself in ``cptflow.tokenizer.sp_to_hf``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
WS = "\u2581"  # SentencePiece's visible space "▁"
# Whitespace shapes that tell tokenizer implementations apart (leading spaces, runs, tabs, newlines);
# every verification encodes them besides the held-out text. The last one has CJK, the others none.
PROBES = (" lead", "  two", "a    b", "\tTab\n\n  indented", "trail  ", "x" + " " * 40 + "y", " ", "",
          "中文 English  混合\n  缩进")

# Han ideographs: unified (+ extension A..I), compatibility ideographs and their supplement.
_HAN = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x323AF))
# Other East Asian scripts and CJK punctuation: none of them occurs in English text or code, which is
# what ``require_cjk`` relies on. CJK symbols/punctuation, kana, bopomofo, Hangul, compatibility and
# full/half-width forms.
_CJK_OTHER = (
    (0x3000, 0x303F), (0x3040, 0x30FF), (0x3100, 0x312F), (0x31A0, 0x31FF), (0xAC00, 0xD7AF),
    (0xFE30, 0xFE4F), (0xFF00, 0xFFEF),
)


def _char_class(ranges: Sequence[tuple[int, int]]) -> str:
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


HAN_RE = re.compile(f"[{_char_class(_HAN)}]")
CJK_RE = re.compile(f"[{_char_class(_HAN + _CJK_OTHER)}]")


def has_cjk(text: str) -> bool:
    """Whether ``text`` holds a CJK character (``HAN_RE`` finds the Chinese characters alone)."""
    return CJK_RE.search(text) is not None


def load_proto(data: bytes) -> pb.ModelProto:
    m = pb.ModelProto()
    m.ParseFromString(data)
    return m


def processor(proto: pb.ModelProto) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


@dataclass
class Selection:
    """Pieces chosen for appending, with the reason each rejected candidate was left out."""

    pieces: list[str] = field(default_factory=list)
    origin: list[str] = field(default_factory=list)  # which method proposed each piece
    skipped: dict[str, int] = field(default_factory=dict)


def select_pieces(
    base: pb.ModelProto, candidates: Iterable[tuple[str, str]], *, require_cjk: bool
) -> Selection:
    """Filter ``(piece, origin)`` candidates, in order, down to the ones worth appending.

    Order is kept (it becomes the id order). A multi-character candidate is reachable only through
    base pieces, accepted single characters, or pieces accepted before it, which holds in a trained
    BPE model's own order (a merge comes after the pieces it joins).
    """
    candidates = list(candidates)
    taken = {p.piece for p in base.pieces}
    normal = {p.piece for p in base.pieces if p.type == NORMAL}
    sel = Selection()

    def skip(reason: str) -> None:
        sel.skipped[reason] = sel.skipped.get(reason, 0) + 1

    def why_not(piece: str) -> str | None:
        if piece in taken:
            return "in_vocab"
        if not piece.strip(WS + " \t\r\n"):
            return "whitespace"
        if _BYTE_PIECE.match(piece):
            return "byte"
        if require_cjk and not has_cjk(piece):
            return "no_cjk"
        return None

    # Single characters are BPE's starting symbols whatever their id, and a trained model lists them
    # after the merges built from them: make them available to the reachability test first.
    for piece, _ in candidates:
        if len(piece) == 1 and why_not(piece) is None:
            normal.add(piece)
    for piece, origin in candidates:
        reason = why_not(piece)
        if reason is None and len(piece) > 1:
            if not any(piece[:k] in normal and piece[k:] in normal for k in range(1, len(piece))):
                reason = "unreachable"
        if reason:
            skip(reason)
            continue
        taken.add(piece)
        normal.add(piece)
        sel.pieces.append(piece)
        sel.origin.append(origin)
    return sel


def appended_scores(min_base_score: float, n: int) -> list[float]:
    """``n`` float32 scores strictly below ``min_base_score``, strictly decreasing.

    Scores are stored as float32 in the model. Where float32 can hold integers (|s| < 2**24) this gives
    min-1, min-2, ...; near the -1e9 sentinel float32 steps are 64 apart, so each score is the next
    representable float below the previous one instead: always distinct, so no tie-break rule is needed
    and the fast tokenizer's merge ranks (sorted by score) are exactly SentencePiece's order.
    """
    out: list[float] = []
    prev = np.float32(min_base_score)
    for _ in range(n):
        s = np.float32(prev - np.float32(1.0))
        if not s < prev:
            s = np.nextafter(prev, np.float32(-np.inf))
        out.append(float(s))
        prev = s
    return out


def append_pieces(base: pb.ModelProto, pieces: Sequence[str]) -> pb.ModelProto:
    """A copy of ``base`` with ``pieces`` appended as NORMAL pieces; nothing of the base changes."""
    merged = pb.ModelProto()
    merged.CopyFrom(base)
    for piece, score in zip(pieces, appended_scores(min(p.score for p in base.pieces), len(pieces)), strict=True):
        sp = merged.pieces.add()
        sp.piece, sp.score, sp.type = piece, score, NORMAL
    return merged


def verify_merge(
    base: pb.ModelProto, merged: pb.ModelProto, texts: Sequence[str], same_ids: Sequence[str] = (),
    *, require_cjk: bool = True,
) -> None:
    """Raise ``ValueError`` with the reason if ``merged`` is not a safe expansion of ``base``.

    Checks: the first N pieces (piece, score, type) equal the base's; special ids and the normaliser
    are unchanged; appended pieces are new, unique, NORMAL, scored strictly below every base score
    in strictly decreasing order (and hold a CJK character if ``require_cjk``); SentencePiece
    round-trips every text in ``texts`` and ``PROBES`` (a literal "▁" comes back as a space:
    SentencePiece cannot tell them apart, before or after the merge); and every text in ``same_ids``
    (e.g. held-out English; plus the CJK-free probes if ``require_cjk``) encodes to the base ids.
    """
    n = len(base.pieces)
    if len(merged.pieces) < n:
        raise ValueError(f"merged vocabulary ({len(merged.pieces)}) is smaller than the base ({n})")
    for i in range(n):
        a, b = base.pieces[i], merged.pieces[i]
        if (a.piece, a.score, a.type) != (b.piece, b.score, b.type):
            raise ValueError(f"base piece {i} changed: {(a.piece, a.score, a.type)} -> {(b.piece, b.score, b.type)}")
    ts_a, ts_b = base.trainer_spec, merged.trainer_spec
    keys = ("unk_id", "bos_id", "eos_id", "pad_id", "unk_piece", "bos_piece", "eos_piece", "pad_piece", "byte_fallback")
    for key in keys:
        if getattr(ts_a, key) != getattr(ts_b, key):
            raise ValueError(f"trainer_spec.{key} changed: {getattr(ts_a, key)!r} -> {getattr(ts_b, key)!r}")
    if base.normalizer_spec != merged.normalizer_spec:
        raise ValueError("normalizer_spec changed")
    seen = {p.piece for p in base.pieces}
    prev = min(p.score for p in base.pieces)
    for i in range(n, len(merged.pieces)):
        p = merged.pieces[i]
        if p.type != NORMAL:
            raise ValueError(f"appended piece {i} {p.piece!r} has type {p.type}, not NORMAL")
        if p.piece in seen:
            raise ValueError(f"appended piece {i} {p.piece!r} duplicates an earlier piece")
        if not p.score < prev:
            raise ValueError(f"appended piece {i} {p.piece!r} score {p.score} is not below {prev}")
        if require_cjk and not has_cjk(p.piece):
            raise ValueError(f"appended piece {i} {p.piece!r} has no CJK character")
        seen.add(p.piece)
        prev = p.score
    sp_base, sp_new = processor(base), processor(merged)
    texts, same_ids = [*texts, *PROBES], [*same_ids, *(PROBES[:-1] if require_cjk else ())]
    for k, text in enumerate(texts):
        back = sp_new.decode(sp_new.encode(text))
        if back != text.replace(WS, " "):
            raise ValueError(f"sentencepiece round trip fails on text {k}: {text[:60]!r} -> {back[:60]!r}")
    for k, text in enumerate(same_ids):
        if sp_new.encode(text) != sp_base.encode(text):
            raise ValueError(f"text {k} without new characters encodes differently after the merge: {text[:60]!r}")


