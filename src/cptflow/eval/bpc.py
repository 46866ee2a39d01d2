"""Bits per character and tokens per character on held-out text: metrics that compare across tokenizers.

Perplexity per token cannot compare a base model with an adapted one whose tokenizer cuts Chinese into
half as many tokens; the information the model needs per character can. For every document we encode
``[BOS] + tokens(text)`` and sum ``-log2 P(token | preceding tokens)`` over all text tokens, the first
one included (predicted from BOS alone), then divide the corpus total by its Unicode characters
(``len(text)``: code points, not bytes). Bits per byte divides the same total by the UTF-8 bytes, as
lm-evaluation-harness's ``bits_per_byte`` does (a Chinese character is 3 bytes, so zh bpb is about a
third of bpc; English bpb is close to bpc); quote bpb beside lm-eval numbers, bpc beside the
Chinese-adaptation papers. Tokens per character is the same token count over the same characters.

Long documents — sliding windows: a window holds at most ``window`` input tokens and advances by
``stride`` (≤ window); each window scores only the tokens no earlier window scored, so every token is
scored exactly once and, after the first window, with at least ``window - stride + 1`` tokens of
context (the Hugging Face "perplexity of fixed-length models" scheme). Later windows do not start
with BOS. ``stride == window`` gives plain chunks (fast, less context); a small stride gives more
context at more compute. The scheme and its numbers are recorded with the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from cptflow.core.io import PathLike
from cptflow.eval.forward import token_logprobs


def spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``n_tokens`` (position 0 = BOS, never a target).

    Each span ``(begin, end, n_new)`` means: feed ``seq[begin:end-1]`` and score ``seq[end-n_new:end]``.
    """
    if not 1 <= stride <= window:
        raise ValueError(f"bpc: stride {stride} must be between 1 and the window {window}")
    out, begin, done = [], 0, 1
    while done < n_tokens:
        end = min(begin + window + 1, n_tokens)
        out.append((begin, end, end - done))
        done = end
        begin += stride
    return out


def encode_docs(tok, texts: Sequence[str]) -> list[list[int]]:
    """``[BOS] + tokens`` per document (no BOS if the tokenizer has none: then the first token is unscored)."""
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return [bos + x for x in ids]


def bits_per_char(model, tok, texts: Sequence[str], *, window: int, stride: int, batch_size: int,
                  pad_id: int) -> dict[str, Any]:
    """Corpus-level bpc and tokens/char of ``texts`` under ``model``."""
    docs = encode_docs(tok, texts)
    has_bos = tok.bos_token_id is not None
    inputs, targets = [], []
    for seq in docs:
        for begin, end, n_new in spans(len(seq), window, stride):
            inputs.append(seq[begin:end - 1])
            targets.append(seq[end - n_new:end])
    lps = token_logprobs(model, inputs, targets, batch_size, pad_id)
    nats = -sum(float(lp.double().sum()) for lp in lps)
    chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    tokens = sum(len(s) - int(has_bos) for s in docs)
    scored = sum(len(t) for t in targets)
    return {"docs": len(texts), "chars": chars, "bytes": n_bytes, "tokens": tokens, "scored_tokens": scored,
            "bits": round(nats / math.log(2), 4), "bpc": round(nats / math.log(2) / max(1, chars), 6),
            "bpb": round(nats / math.log(2) / max(1, n_bytes), 6),
            "tokens_per_char": round(tokens / max(1, chars), 6), "window": window, "stride": stride,
            "scheme": "sliding windows: each token scored once, first text token predicted from BOS"}


def read_texts(path: PathLike, field: str = "text", max_docs: int = 0) -> list[str]:
    """Texts of a held-out JSONL; a record without the field is an error naming the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON record with a {field!r} field ({e})") from e
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} is not a string")
            if text:
                out.append(text)
            if max_docs and len(out) >= max_docs:
                break
    return out
