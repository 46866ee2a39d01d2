"""Resize a base model's embeddings to an expanded tokenizer and initialise the new rows.

Vocabulary expansion appends pieces after the base ids (base ids never move), so the base model's
rows are copied unchanged and only the appended rows need values:

* ``mean``: every new row is the mean of all old rows — a neutral start that makes no claim about
  the token.
* ``piece_mean``: a new token's row is the mean of the rows of the pieces the OLD tokenizer splits
  the token's text into (for "中国" the rows of "中" and "国"), so the new token starts where the old
  model already put its meaning. Special/control tokens are excluded, and so is the lone
  word-boundary piece "▁": Colossal-LLaMA-2's initialisation encodes each new token with the dummy
  prefix on and so folds "▁" into nearly every average, pulling all new Chinese tokens toward one
  shared vector. We encode without the dummy prefix (a piece without "▁" stands for text inside a
  word) and drop any lone "▁". A token with nothing left (or a new special token) gets the mean.

The matrix is padded to a multiple of ``pad_to_multiple_of`` (64: matmul shapes that divide evenly
into tensor-core tiles run at full speed on GPUs; nanoGPT pads 50257 → 50304 for the same reason).
Padding rows never correspond to a token; they get the overall mean of the old rows, so each
padding logit equals the average base logit (low, and predictable) rather than an arbitrary 0, and
training pushes them down like any never-seen token. With untied embeddings, lm_head's new rows are
initialised the same way from lm_head's own old rows. Rows [0, len(base tokenizer)) are copied bit
for bit, so on inputs of base tokens the logits over base ids equal the base model's (tested).

Means are computed in float32 with one ``index_add_`` over a (new row, old piece) index list: a
70k vocabulary takes well under a second on CPU. The result is saved in the training ``dtype``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.cli import stage_main
from cptflow.config import ConfigError, from_dict, to_dict
from cptflow.hf import DTYPES, copy_tokenizer, load_causal_lm, load_tokenizer, save_model, torch_dtype
from cptflow.io import atomic_path
from cptflow.stats import Stats, Timer, write_manifest

VERSION = 1
METHODS = ("mean", "piece_mean")
WORD_BOUNDARY = "▁"  # SentencePiece's meta symbol for a space / word start
log = logging.getLogger("cptflow.init_model")


@dataclass(frozen=True)
class InitModelConfig:
    """How the expanded embedding matrix is sized and filled."""

    method: str = "piece_mean"  # mean | piece_mean (see the module docstring)
    pad_to_multiple_of: int = 64  # vocab rows padded to a multiple of this: tensor-core friendly matmuls
    dtype: str = "float32"  # dtype of the saved model = the training dtype (float32|bfloat16|float16)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"init_model.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.pad_to_multiple_of < 1:
            raise ConfigError("init_model.pad_to_multiple_of must be >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError(f"init_model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def padded_size(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def check_base_ids(old_tok: Any, new_tok: Any) -> None:
    """Raise ValueError unless the new tokenizer starts with the old one's pieces, id for id."""
    n_old = len(old_tok)
    if len(new_tok) < n_old:
        raise ValueError(f"new tokenizer has {len(new_tok)} tokens, fewer than the base's {n_old}")
    old = old_tok.convert_ids_to_tokens(list(range(n_old)))
    new = new_tok.convert_ids_to_tokens(list(range(n_old)))
    for i, (a, b) in enumerate(zip(old, new)):
        if a != b:
            raise ValueError(f"base ids moved: id {i} is {a!r} in the base tokenizer but {b!r} in the new one")


def _excluded_ids(tok: Any) -> set[int]:
    """Old ids that never contribute to a piece mean: special/control tokens and the lone '▁'."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, t in tok.added_tokens_decoder.items() if t.special)
    boundary = tok.convert_tokens_to_ids(WORD_BOUNDARY)
    if boundary is not None and boundary != tok.unk_token_id:
        ids.add(boundary)
    return ids


def _prefixless_encoder(tok: Any) -> tuple[Any, bool]:
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


def piece_groups(old_tok: Any, new_tok: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """For every new token, the old ids its text splits into (exclusions applied).

    Returns ``(rows, cols, n_special)``: ``rows[j]`` is a new token's offset from ``len(old_tok)``
    and ``cols[j]`` one old id contributing to it (repeats kept: "哈哈哈" → three times "哈");
    ``n_special`` counts new special tokens, which get no pieces (hence the mean).
    """
    n_old, n_new = len(old_tok), len(new_tok)
    new_ids = list(range(n_old, n_new))
    pieces = new_tok.convert_ids_to_tokens(new_ids)
    special = {i for i, t in new_tok.added_tokens_decoder.items() if t.special} | set(new_tok.all_special_ids)
    encoder, sp_style = _prefixless_encoder(old_tok)
    texts = [
        "" if i in special else (p.replace(WORD_BOUNDARY, " ") if sp_style else new_tok.decode([i]))
        for i, p in zip(new_ids, pieces)
    ]
    encs = encoder.encode_batch_fast(texts, add_special_tokens=False)
    excluded = np.fromiter(_excluded_ids(old_tok), dtype=np.int64)
    lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    cols = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=int(lens.sum()))
    rows = np.repeat(np.arange(len(encs), dtype=np.int64), lens)
    keep = ~np.isin(cols, excluded) & (cols < n_old)
    return rows[keep], cols[keep], sum(i in special for i in new_ids)


def expand_matrix(old: Any, n_old: int, n_new: int, size: int, rows: np.ndarray, cols: np.ndarray) -> Any:
    """A ``[size, hidden]`` float32 matrix: old rows copied, new rows piece means, the rest the mean.

    ``old`` holds at least ``n_old`` rows (a base model may itself be padded: rows past ``n_old``
    were never a token and are not used). New tokens with no contributing piece get the mean of the
    old rows, as do padding rows ``[n_new, size)``.
    """
    import torch

    src = old[:n_old].float()
    mean = src.mean(dim=0)
    out = mean.expand(size, src.shape[1]).clone()
    out[:n_old] = src
    n_add = n_new - n_old
    if n_add and len(rows):
        r = torch.from_numpy(rows)
        sums = torch.zeros(n_add, src.shape[1]).index_add_(0, r, src[torch.from_numpy(cols)])
        counts = torch.bincount(r, minlength=n_add)
        has = counts > 0
        out[n_old:n_new][has] = sums[has] / counts[has].unsqueeze(1).float()
    return out


def init_model(model: Any, old_tok: Any, new_tok: Any, cfg: InitModelConfig) -> dict[str, Any]:
    """Resize ``model`` in place to the new tokenizer and fill the new rows; return counts."""
    import torch

    check_base_ids(old_tok, new_tok)
    n_old, n_new = len(old_tok), len(new_tok)
    size = padded_size(n_new, cfg.pad_to_multiple_of)
    emb_old = model.get_input_embeddings().weight.detach()
    if emb_old.shape[0] < n_old:
        raise ValueError(f"base model has {emb_old.shape[0]} embedding rows for a {n_old}-token tokenizer")
    out_layer = model.get_output_embeddings()
    tied = out_layer is None or out_layer.weight.data_ptr() == emb_old.data_ptr()
    if cfg.method == "piece_mean":
        rows, cols, n_special = piece_groups(old_tok, new_tok)
    else:
        rows, cols, n_special = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    new_in = expand_matrix(emb_old, n_old, n_new, size, rows, cols)
    new_out = None if tied else expand_matrix(out_layer.weight.detach(), n_old, n_new, size, rows, cols)
    # resize_token_embeddings keeps the tie and updates config.vocab_size; its own init of the new rows
    # is overwritten below (mean_resizing=False skips its covariance sampling, which we do not want).
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(new_in)
        if new_out is not None:
            model.get_output_embeddings().weight.copy_(new_out)
    model.to(torch_dtype(cfg.dtype))
    n_add = n_new - n_old
    with_pieces = len(np.unique(rows)) if len(rows) else 0
    return {
        "vocab_base": n_old, "vocab_new": n_new, "vocab_padded": size,
        "rows_added": n_add, "rows_padding": size - n_new,
        "rows_mean_fallback": n_add - with_pieces if cfg.method == "piece_mean" else n_add,
        "new_special_tokens": n_special, "pieces_used": int(len(rows)), "tied": bool(tied),
    }


def run(
    cfg: InitModelConfig,
    base_model_dir: str | Path,
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    stats_path: str | Path | None = None,
    base_tokenizer_dir: str | Path | None = None,
) -> Stats:
    """Load the base model (safetensors only), resize/init, save model + new tokenizer atomically."""
    stats = Stats()
    with Timer() as timer:
        model = load_causal_lm(base_model_dir)
        old_tok = load_tokenizer(base_tokenizer_dir or base_model_dir)
        new_tok = load_tokenizer(tokenizer_dir)
        with Timer() as t_init:
            info = init_model(model, old_tok, new_tok, cfg)
        for k, v in info.items():
            if k != "tied":
                stats.update(k, v)
        log.info("%s init of %d new rows (+%d padding rows) in %.2f s; %d fell back to the mean; tied=%s",
                 cfg.method, info["rows_added"], info["rows_padding"], t_init.seconds,
                 info["rows_mean_fallback"], info["tied"])
        with atomic_path(output_dir) as tmp:
            tmp.mkdir(parents=True)
            save_model(model, tmp)
            copy_tokenizer(tokenizer_dir, tmp)
    if stats_path:
        inputs = [base_model_dir, tokenizer_dir] + ([base_tokenizer_dir] if base_tokenizer_dir else [])
        write_manifest(stats_path, stage="init_model", version=VERSION, params=to_dict(cfg), inputs=inputs,
                       stats=stats, seconds=timer.seconds, outputs=[output_dir],
                       extra={"method": cfg.method, "tied": info["tied"], "dtype": cfg.dtype,
                              "init_seconds": round(t_init.seconds, 3)})
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", required=True, help="base Hugging Face model directory (safetensors)")
    p.add_argument("--tokenizer", required=True, help="expanded tokenizer directory (base ids first)")
    p.add_argument("--base-tokenizer", default=None, help="base tokenizer directory (default: --base-model)")
    p.add_argument("--output-dir", required=True, help="model directory to write")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(InitModelConfig, params, "init_model")
    run(cfg, args.base_model, args.tokenizer, args.output_dir, args.stats, args.base_tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("init_model", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
