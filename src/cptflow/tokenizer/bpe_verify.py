"""Checks and audit of an expanded byte-level BPE tokenizer folder, run before the vocab stage publishes it.

``verify_expansion`` raises ``ValueError`` naming the first failure:

* structure: every base token keeps its id, the base merges are the first merges in the same order,
  new ids follow every existing id without gaps, added tokens and the normaliser, pre-tokeniser,
  decoder and post-processor are unchanged;
* the saved folder, loaded with ``AutoTokenizer``, gives the same ids as the ``tokenizers`` pipeline
  the merges were learned with, and decodes every text back;
* texts that must not change (English, code, whitespace probes) encode to exactly the base's ids;
* every new token is reachable: its bytes alone encode to it alone, and when they are whole
  characters, so does its text (a token only ever formed inside longer words would never be used).

``audit`` counts what the report and the manifest show: reachability, and how many new tokens
held-out text actually uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cptflow.tokenizer.bpe_merges import token_bytes
from cptflow.tokenizer.sp_merge import PROBES, has_cjk

_UNCHANGED = ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation", "padding")


def check_structure(base: Mapping[str, Any], new: Mapping[str, Any], first_id: int) -> int:
    """Raise unless ``new`` is ``base`` plus appended tokens and merges; returns the number appended."""
    for key in _UNCHANGED:
        if base.get(key) != new.get(key):
            raise ValueError(f"tokenizer.json {key!r} changed")
    bm, nm = base["model"], new["model"]
    for key in set(bm) | set(nm):
        if key not in ("vocab", "merges") and bm.get(key) != nm.get(key):
            raise ValueError(f"tokenizer.json model.{key} changed: {bm.get(key)!r} -> {nm.get(key)!r}")
    for tok, i in bm["vocab"].items():
        if nm["vocab"].get(tok) != i:
            raise ValueError(f"base token {tok!r} (id {i}) moved to {nm['vocab'].get(tok)!r}")
    added = sorted(i for tok, i in nm["vocab"].items() if tok not in bm["vocab"])
    if added != list(range(first_id, first_id + len(added))):
        raise ValueError(f"new ids are not {first_id}..{first_id + len(added) - 1} in order")
    n = len(bm["merges"])
    if nm["merges"][:n] != bm["merges"]:
        bad = next(k for k in range(n) if nm["merges"][k] != bm["merges"][k])
        raise ValueError(f"base merge {bad} changed: {bm['merges'][bad]!r} -> {nm['merges'][bad]!r}")
    if len(nm["merges"]) - n != len(added):
        raise ValueError(f"{len(nm['merges']) - n} merges appended for {len(added)} new tokens")
    return len(added)


def whole_text(token: str) -> str | None:
    """The text of a byte-level token, or None if its bytes end or start inside a character."""
    try:
        return token_bytes(token).decode("utf-8")
    except UnicodeDecodeError:
        return None


def new_tokens(data: Mapping[str, Any], first_id: int) -> list[tuple[int, str]]:
    """``(id, token)`` of every vocabulary entry at or above ``first_id``, by id."""
    return sorted((i, t) for t, i in data["model"]["vocab"].items() if i >= first_id)


def _ids(tok: Any, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def verify_expansion(
    base_auto: Any, new_auto: Any, raw: Any, base_json: Mapping[str, Any], new_json: Mapping[str, Any],
    first_id: int, texts: Sequence[str], same_ids: Sequence[str], *, require_cjk: bool,
) -> None:
    """All the checks of the module docstring; ``raw`` is the ``tokenizers.Tokenizer`` of ``new_json``.

    ``texts`` must round-trip and agree between ``new_auto`` and ``raw``; ``same_ids`` (plus the
    CJK-free whitespace probes when ``require_cjk``) must keep ``base_auto``'s ids.
    """
    n_new = check_structure(base_json, new_json, first_id)
    if len(new_auto) != first_id + n_new:
        raise ValueError(f"AutoTokenizer loads {len(new_auto)} tokens, expected {first_id + n_new}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(new_auto, name, None) != getattr(base_auto, name, None):
            raise ValueError(f"{name} changed: {getattr(base_auto, name, None)} -> {getattr(new_auto, name, None)}")
    texts = [*texts, *PROBES]
    got = _ids(new_auto, texts)
    want = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    for k, (text, a, b) in enumerate(zip(texts, got, want, strict=True)):
        if a != b:
            raise ValueError(f"AutoTokenizer and the tokenizer.json pipeline differ on text {k}: {text[:60]!r}")
        back = new_auto.decode(a, clean_up_tokenization_spaces=False)
        if back != text:
            raise ValueError(f"round trip fails on text {k}: {text[:60]!r} -> {back[:60]!r}")
    same = [*same_ids, *(p for p in PROBES if not has_cjk(p))] if require_cjk else list(same_ids)
    for k, (text, a, b) in enumerate(zip(same, _ids(new_auto, same), _ids(base_auto, same), strict=True)):
        if a != b:
            raise ValueError(f"text {k} without new characters encodes differently after expansion: {text[:60]!r}")
    bad = unreachable(raw, new_auto, new_json, first_id)
    if bad:
        raise ValueError(f"{len(bad)} new tokens are unreachable, e.g. id {bad[0][0]} {bad[0][1]!r}")


def unreachable(raw: Any, auto: Any, data: Mapping[str, Any], first_id: int) -> list[tuple[int, str]]:
    """New tokens that encoding their own bytes (or text, for whole characters) does not give alone."""
    new = new_tokens(data, first_id)
    bad = [(i, t) for i, t in new if [x.id for x in raw.model.tokenize(t)] != [i]]
    whole = [(i, t, s) for i, t in new if (s := whole_text(t)) is not None]
    got = _ids(auto, [s for _, _, s in whole])
    bad += [(i, t) for (i, t, _), ids in zip(whole, got, strict=True) if ids != [i]]
    return sorted(set(bad))


def audit(raw: Any, auto: Any, data: Mapping[str, Any], first_id: int,
          heldout: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Reachability and use of the new tokens, for the report and the manifest."""
    new = new_tokens(data, first_id)
    whole = sum(whole_text(t) is not None for _, t in new)
    out: dict[str, Any] = {
        "new_tokens": len(new), "whole_character_tokens": whole, "fragment_tokens": len(new) - whole,
        "reachable": len(new) - len(unreachable(raw, auto, data, first_id)), "heldout": {},
    }
    for lang, texts in heldout.items():
        ids = [i for row in _ids(auto, texts) for i in row]
        used = {i for i in ids if i >= first_id}
        out["heldout"][lang] = {
            "new_tokens_used": len(used), "new_tokens_used_share": len(used) / len(new) if new else 0.0,
            "tokens": len(ids), "new_token_occurrences": sum(i >= first_id for i in ids)}
    return out
