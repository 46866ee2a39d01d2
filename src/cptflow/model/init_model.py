"""Resize a base model's embeddings to an expanded tokenizer and initialise the new rows.

Vocabulary expansion appends pieces after the base ids (base ids never move), so the base model's
rows are copied unchanged and only the appended rows need values:

* ``mean``: every new row is the mean of all old rows — a neutral start that makes no claim about
  the token.
* ``piece_mean``: a new token's row is the mean of the rows of the pieces the BASE tokenizer splits
  the token's text into (for "中国" the rows of "中" and "国"), so the new token starts where the old
  model already put its meaning. The rules per tokenizer kind (no "▁", no byte-fallback pieces for
  SentencePiece bases; the base BPE merges on the token's bytes for byte-level BPE) are in
  ``cptflow.model.pieces``. A token with nothing left (or a new special token) gets the mean.

The matrix is padded to a multiple of ``pad_to_multiple_of`` (64: matmul shapes that divide evenly
into tensor-core tiles run at full speed on GPUs; nanoGPT pads 50257 → 50304 for the same reason).
Padding rows never correspond to a token; they get the overall mean of the old rows, so each
padding logit equals the average base logit (low, and predictable) rather than an arbitrary 0, and
training pushes them down like any never-seen token. With untied embeddings, lm_head's new rows are
initialised the same way from lm_head's own old rows. Rows [0, len(base tokenizer)) are copied bit
for bit, so on inputs of base tokens the logits over base ids equal the base model's (tested).

Means are computed in float32 with one ``index_add_`` over a (new row, old piece) index list: a
70k vocabulary takes well under a second on CPU. The result keeps the base's stored dtype unless
``dtype`` says otherwise. config.json records the base vocabulary size (``cptflow_base_vocab_size``),
which ``trainable: new_embeddings_only`` needs to know which rows are new.

No new token (``vocab.method: none``) and no dtype change: the base is passed through — its files
linked or copied unchanged, no padding added — so the DAG after it runs as for an expanded vocabulary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cptflow.core.cli import stage_main
from cptflow.core.config import ConfigError, from_dict, to_dict
from cptflow.core.io import atomic_path
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.model.hf import TOKENIZER_FILES, copy_tokenizer, link_or_copy, load_tokenizer, save_model
from cptflow.model.loader import DTYPES, check_model_dir, load_causal_lm, torch_dtype
from cptflow.model.modeling import BASE_VOCAB_KEY, stored_dtype
from cptflow.model.pieces import is_byte_level, piece_groups
from cptflow.model.safetensors_header import model_files
from cptflow.model.safetensors_io import peak_rss_mb

VERSION = 2  # 2: byte-fallback pieces excluded, byte-level BPE pieces, dtype auto, pass-through, base vocab key
METHODS = ("mean", "piece_mean")
log = logging.getLogger("cptflow.model.init_model")


@dataclass(frozen=True)
class InitModelConfig:
    """How the expanded embedding matrix is sized and filled."""

    method: str = "piece_mean"  # mean | piece_mean (see the module docstring)
    pad_to_multiple_of: int = 64  # vocab rows padded to a multiple of this: tensor-core friendly matmuls
    dtype: str = "auto"  # dtype of the saved model: auto = the base's stored dtype, or float32|bfloat16|float16

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"init_model.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.pad_to_multiple_of < 1:
            raise ConfigError("init_model.pad_to_multiple_of must be >= 1")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"init_model.dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")


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


def init_model(model: Any, old_tok: Any, new_tok: Any, cfg: InitModelConfig, dtype: str) -> dict[str, Any]:
    """Resize ``model`` in place to the new tokenizer, fill the new rows, cast to ``dtype``; return counts."""
    import torch

    check_base_ids(old_tok, new_tok)
    n_old, n_new = len(old_tok), len(new_tok)
    emb_old = model.get_input_embeddings().weight.detach()
    if emb_old.shape[0] < n_old:
        raise ValueError(f"base model has {emb_old.shape[0]} embedding rows for a {n_old}-token tokenizer")
    n_add = n_new - n_old
    # No new token: keep the base's own row count (no padding added to a model nobody resized).
    size = padded_size(n_new, cfg.pad_to_multiple_of) if n_add else emb_old.shape[0]
    out_layer = model.get_output_embeddings()
    tied = out_layer is None or out_layer.weight.data_ptr() == emb_old.data_ptr()
    if cfg.method == "piece_mean" and n_add:
        rows, cols, n_special = piece_groups(old_tok, new_tok)
    else:
        rows, cols, n_special = np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    if n_add:
        new_in = expand_matrix(emb_old, n_old, n_new, size, rows, cols)
        new_out = None if tied else expand_matrix(out_layer.weight.detach(), n_old, n_new, size, rows, cols)
        # resize_token_embeddings keeps the tie and updates config.vocab_size; its own init of the new rows
        # is overwritten below (mean_resizing=False skips its covariance sampling, which we do not want).
        model.resize_token_embeddings(size, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(new_in.to(emb_old.dtype))
            if new_out is not None:
                model.get_output_embeddings().weight.copy_(new_out.to(emb_old.dtype))
        setattr(model.config, BASE_VOCAB_KEY, n_old)
    model.to(torch_dtype(dtype))
    with_pieces = len(np.unique(rows)) if len(rows) else 0
    return {
        "vocab_base": n_old, "vocab_new": n_new, "vocab_padded": size,
        "rows_added": n_add, "rows_padding": size - n_new,
        "rows_mean_fallback": n_add - with_pieces if cfg.method == "piece_mean" else n_add,
        "new_special_tokens": n_special, "pieces_used": int(len(rows)), "tied": bool(tied),
    }


def pass_through(base_model_dir: Path, tokenizer_dir: Path, out: Path) -> None:
    """The base model unchanged (weight files linked or copied), with the (identical) tokenizer beside it."""
    out.mkdir(parents=True)
    for rel in model_files(base_model_dir):
        if rel in TOKENIZER_FILES:  # from tokenizer_dir below (copied: never write through a link)
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(base_model_dir / rel, out / rel)
    copy_tokenizer(tokenizer_dir, out)


def run(
    cfg: InitModelConfig,
    base_model_dir: str | Path,
    tokenizer_dir: str | Path,
    output_dir: str | Path,
    stats_path: str | Path | None = None,
    base_tokenizer_dir: str | Path | None = None,
) -> Stats:
    """Load the base model (through the safe loader), resize/init, save model + new tokenizer atomically."""
    stats = Stats()
    with Timer() as timer:
        check_model_dir(base_model_dir)  # before anything else reads it: pickles, remote code, truncation
        old_tok = load_tokenizer(base_tokenizer_dir or base_model_dir)
        new_tok = load_tokenizer(tokenizer_dir)
        check_base_ids(old_tok, new_tok)
        stored = str(stored_dtype(base_model_dir)).removeprefix("torch.")
        dtype = stored if cfg.dtype == "auto" else cfg.dtype
        passed = len(new_tok) == len(old_tok) and dtype == stored
        with Timer() as t_init, atomic_path(output_dir) as tmp:
            if passed:
                load_causal_lm(base_model_dir)  # the same checks as any read, then the files as they are
                pass_through(Path(base_model_dir), Path(tokenizer_dir), tmp)
                info = {"vocab_base": len(old_tok), "vocab_new": len(new_tok), "rows_added": 0, "tied": None}
            else:
                model = load_causal_lm(base_model_dir)
                info = init_model(model, old_tok, new_tok, cfg, dtype)
                tmp.mkdir(parents=True)
                save_model(model, tmp)
                copy_tokenizer(tokenizer_dir, tmp)
        for k, v in info.items():
            if k != "tied":
                stats.update(k, v)
        if passed:
            log.info("no new tokens and dtype %s unchanged: base model passed through", dtype)
        else:
            log.info("%s init of %d new rows (+%d padding rows) in %.2f s; %d fell back to the mean; tied=%s; %s",
                     cfg.method, info["rows_added"], info["rows_padding"], t_init.seconds,
                     info["rows_mean_fallback"], info["tied"], dtype)
    if stats_path:
        inputs = [base_model_dir, tokenizer_dir] + ([base_tokenizer_dir] if base_tokenizer_dir else [])
        write_manifest(stats_path, stage="init_model", version=VERSION, params=to_dict(cfg), inputs=inputs,
                       stats=stats, seconds=timer.seconds, outputs=[output_dir],
                       extra={"method": cfg.method, "tied": info["tied"], "dtype": dtype, "passed_through": passed,
                              "byte_level_bpe": is_byte_level(old_tok), "init_seconds": round(t_init.seconds, 3),
                              "peak_rss_mb": peak_rss_mb()})
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", required=True, help="base Hugging Face model directory (safetensors)")
    p.add_argument("--tokenizer", required=True, help="expanded tokenizer directory (base ids first)")
    p.add_argument("--base-tokenizer", default=None, help="base tokenizer directory (default: --base-model)")
    p.add_argument("--output-dir", required=True, help="model directory to write")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(InitModelConfig, params, "init_model")
    verify_inputs([args.base_model, args.tokenizer])
    run(cfg, args.base_model, args.tokenizer, args.output_dir, args.stats, args.base_tokenizer)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("init_model", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
