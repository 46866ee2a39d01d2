"""Which base rows each new token's row averages (``init_model.method: piece_mean``).

A new token starts where the base model already put its meaning: at the mean of the rows of the
pieces the BASE tokenizer splits the token's text into ("中国" → the rows of "中" and "国"). How the
text is split depends on the tokenizer kind:

* **SentencePiece-style** (LLaMA-2, Mistral; ``tokenizer.model`` or a Metaspace / ``Prepend("▁")``
  tokenizer.json): the token's text is encoded without the dummy prefix (a piece without "▁" stands
  for text inside a word; Colossal-LLaMA-2 encodes with the prefix on and so folds "▁" into nearly
  every average), and the lone "▁" is dropped. **Byte-fallback pieces** ``<0xE4>``… are dropped too:
  on a base without Chinese characters every new character would otherwise be the mean of its three
  UTF-8 byte rows, and characters sharing a lead byte (most of CJK starts with 0xE4–0xE9) would all
  start at nearly the same vector — the collapse the "▁" rule avoids. A token left with no piece
  gets the overall mean.
* **Byte-level BPE** (LLaMA-3, Qwen2, SmolLM, GPT-2): a token of the expanded BPE vocabulary is a
  string over the byte alphabet ("ä¸ŃåĽ½" = the UTF-8 bytes of "中国"), possibly part of a character.
  Its base tokenization is the base BPE model applied to that string directly
  (``tokenizers`` ``Model.tokenize``): the same merges the base would apply to those bytes inside a
  word, with no pre-tokenizer or decoding in between (decoding a partial character would give U+FFFD).
  Added tokens (``tokenizer.add_tokens`` style) hold plain text and are encoded with the full base tokenizer.

Special/control tokens never contribute, and new special tokens get the mean.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

WORD_BOUNDARY = "▁"  # SentencePiece's meta symbol for a space / word start
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback pieces


def is_byte_level(tok: Any) -> bool:
    """True for a byte-level BPE tokenizer (``cptflow.tokenizer.kind``'s byte_bpe): tokens over the byte alphabet."""
    from cptflow.tokenizer.kind import BYTE_BPE, json_kind

    return json_kind("tokenizer.json", json.loads(tok.backend_tokenizer.to_str())).kind == BYTE_BPE


def excluded_ids(tok: Any, byte_level: bool) -> set[int]:
    """Old ids that never contribute to a piece mean: special/control tokens; for SentencePiece-style
    tokenizers also the lone '▁' and the byte-fallback pieces."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    if not byte_level:
        boundary = tok.convert_tokens_to_ids(WORD_BOUNDARY)
        if boundary is not None and boundary != tok.unk_token_id:
            ids.add(boundary)
        ids.update(i for t, i in tok.get_vocab().items() if BYTE_PIECE.fullmatch(t))
    return ids


def prefixless_encoder(tok: Any) -> tuple[Any, bool]:
    """A copy of the old tokenizer's backend that adds no dummy "▁" at the start of a text.

    Returns (tokenizer, is_sentencepiece_style). SentencePiece-style tokenizers add the prefix either
    in a ``Metaspace`` pre-tokenizer (transformers' conversion) or as a ``Prepend("▁")`` normaliser
    (cptflow's own tokenizer.json); both are switched off. Other tokenizers are returned unchanged.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    found = False

    def strip(node: Any) -> Any:
        nonlocal found
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "Prepend" and node.get("prepend") == WORD_BOUNDARY:
            found = True
            return None
        if kind == "Metaspace":
            found = True
            node = {**node, "prepend_scheme": "never"}
            if "add_prefix_space" in node:  # older serialisation of the same switch
                node["add_prefix_space"] = False
        if kind == "Replace" and node.get("content") == WORD_BOUNDARY:
            found = True
        for key in ("normalizers", "pretokenizers"):
            if kind == "Sequence" and key in node:
                node = {**node, key: [c for c in map(strip, node[key]) if c is not None]}
        return node

    spec["normalizer"] = strip(spec.get("normalizer"))
    spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"))
    return Tokenizer.from_str(json.dumps(spec)), found


def _byte_level_pieces(old_tok: Any, new_tok: Any, new_ids: list[int], special: set[int]) -> list[list[int]]:
    from tokenizers import Tokenizer

    base = Tokenizer.from_str(old_tok.backend_tokenizer.to_str())
    added = new_tok.added_tokens_decoder
    out = []
    for i, piece in zip(new_ids, new_tok.convert_ids_to_tokens(new_ids)):
        if i in special:
            out.append([])
        elif i in added:  # plain text (add_tokens): what the base tokenizer makes of it
            out.append(base.encode(added[i].content, add_special_tokens=False).ids)
        else:  # a BPE vocabulary entry over the byte alphabet: the base merges applied to those bytes
            out.append([t.id for t in base.model.tokenize(piece)])
    return out


def piece_groups(old_tok: Any, new_tok: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """For every new token, the old ids its text splits into (exclusions applied).

    Returns ``(rows, cols, n_special)``: ``rows[j]`` is a new token's offset from ``len(old_tok)``
    and ``cols[j]`` one old id contributing to it (repeats kept: "哈哈哈" → three times "哈");
    ``n_special`` counts new special tokens, which get no pieces (hence the mean).
    """
    n_old, n_new = len(old_tok), len(new_tok)
    new_ids = list(range(n_old, n_new))
    special = {i for i, t in new_tok.added_tokens_decoder.items() if t.special} | set(new_tok.all_special_ids)
    byte_level = is_byte_level(old_tok)
    if byte_level:
        groups = _byte_level_pieces(old_tok, new_tok, new_ids, special)
    else:
        encoder, sp_style = prefixless_encoder(old_tok)
        texts = ["" if i in special else (p.replace(WORD_BOUNDARY, " ") if sp_style else new_tok.decode([i]))
                 for i, p in zip(new_ids, new_tok.convert_ids_to_tokens(new_ids))]
        groups = [e.ids for e in encoder.encode_batch_fast(texts, add_special_tokens=False)]
    excluded = np.fromiter(excluded_ids(old_tok, byte_level), dtype=np.int64)
    lens = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    cols = np.fromiter((i for g in groups for i in g), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(len(groups), dtype=np.int64), lens)
    keep = ~np.isin(cols, excluded) & (cols < n_old)
    return rows[keep], cols[keep], sum(i in special for i in new_ids)
