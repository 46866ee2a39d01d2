"""Stage ``pack_encoder``, once per run: the run's tokenizer reduced to what every ``pack_shard`` job needs.

A ``pack_shard`` job that opened the tokenizer through transformers would pay, per input file,
importing transformers and torch (~2 s), ``AutoTokenizer.from_pretrained`` (~0.5 s on a 72k vocabulary)
and a copy of its Rust backend: on the bench's 9 shards that was more than the tokenization itself
(bench/pack.py). This step does it once: it writes the Rust backend exactly as transformers configured
it (``tokenizer.json``, so ids are the ones ``AutoTokenizer`` gives, whatever transformers adjusted
on load) and the special ids the rows need (``encoder.json``: BOS, EOS, pad, the id dtype, the
tokenizer's sha256). ``load_encoder`` opens both with ``tokenizers`` alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict, to_dict
from cptflow.core.io import PathLike, atomic_path, dumps_json, sha256_path
from cptflow.core.provenance import verify_inputs
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.pack.pack_config import ENCODER_KEYS, PackConfig
from cptflow.pack.packed import token_dtype

VERSION = 1
ENCODER_FILES = ("tokenizer.json", "encoder.json")
log = logging.getLogger("cptflow.pack.encoder")


def special_ids(tok: Any, cfg: PackConfig, where: PathLike) -> tuple[int | None, int | None, int]:
    """(BOS or None, EOS or None, pad id) as the config asks; a missing one is an error naming the tokenizer."""
    bos = tok.bos_token_id if cfg.add_bos else None
    eos = tok.eos_token_id if cfg.add_eos else None
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else tok.eos_token_id
    if (cfg.add_bos and bos is None) or (cfg.add_eos and eos is None) or pad_id is None:
        raise ValueError(f"{where}: tokenizer lacks the BOS/EOS/pad id this config needs")
    return bos, eos, int(pad_id)


def max_token_id(tok: Any) -> int:
    """The largest id the tokenizer can produce (vocabulary and added tokens)."""
    return max(len(tok) - 1, *tok.get_vocab().values())


def run(cfg: PackConfig, tokenizer_dir: PathLike, output_dir: PathLike, stats_path: PathLike | None = None) -> Stats:
    """Write the encoder directory of ``tokenizer_dir`` for the special-token settings of ``cfg``."""
    from cptflow.model.hf import load_tokenizer

    stats = Stats()
    with Timer() as timer:
        tok = load_tokenizer(tokenizer_dir)
        bos, eos, pad_id = special_ids(tok, cfg, tokenizer_dir)
        max_id = max(max_token_id(tok), pad_id)
        meta = {"bos": bos, "eos": eos, "pad": pad_id, "max_id": max_id, "dtype": token_dtype(max_id).name,
                "vocab_size": len(tok), "tokenizer_sha256": sha256_path(tokenizer_dir),
                "params": {k: getattr(cfg, k) for k in ENCODER_KEYS}}
        with atomic_path(output_dir) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(), encoding="utf-8")
            (tmp / "encoder.json").write_text(dumps_json(meta), encoding="utf-8")
        stats.update("vocab_size", len(tok))
    log.info("%s: encoder for pack_shard (BOS %s, EOS %s, pad %d, %s ids)", tokenizer_dir, bos, eos, pad_id,
             meta["dtype"])
    if stats_path:
        write_manifest(stats_path, stage="pack_encoder", version=VERSION, params=to_dict(cfg), inputs=[tokenizer_dir],
                       stats=stats, seconds=timer.seconds, outputs=[Path(output_dir) / f for f in ENCODER_FILES])
    return stats


def load_encoder(encoder_dir: PathLike, cfg: PackConfig | None = None) -> tuple[Any, dict[str, Any]]:
    """(Rust tokenizer that encodes special-token strings in text as text, encoder.json), via ``tokenizers`` only.

    A literal "</s>" in a web page is text, not EOS, so only the BOS/EOS that splicing adds mark document
    boundaries. With ``cfg``, its special-token settings must be the ones the encoder was made for.
    """
    from tokenizers import Tokenizer

    d = Path(encoder_dir)
    missing = [f for f in ENCODER_FILES if not (d / f).is_file()]
    if missing:
        raise ValueError(f"{d}: not a pack encoder directory (missing {', '.join(missing)}); "
                         "it is written by `python -m cptflow.pack.encoder`")
    meta = json.loads((d / "encoder.json").read_text(encoding="utf-8"))
    if cfg is not None:
        want = {k: getattr(cfg, k) for k in ENCODER_KEYS}
        if meta.get("params") != want:
            raise ValueError(f"{d / 'encoder.json'}: made for {meta.get('params')}, this pack config has {want}: "
                             "rerun pack_encoder")
    backend = Tokenizer.from_file(str(d / "tokenizer.json"))
    backend.encode_special_tokens = True
    return backend, meta


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (the run's expanded or pinned one)")
    p.add_argument("--output-dir", required=True, help="encoder directory for pack_shard")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(PackConfig, params, "pack")
    verify_inputs([args.tokenizer])
    run(cfg, args.tokenizer, args.output_dir, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("pack_encoder", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
