"""Hugging Face model and tokenizer I/O shared by bootstrap, init_model and the later model stages.

Models are read only through ``cptflow.model.loader`` (safetensors only, no remote code, every tensor
loaded). Here, for writing:

* **Only safetensors.** ``save_model`` checks that nothing pickled was written.
* **Atomic directories.** A model directory is built in a temporary sibling and renamed on success
  (``cptflow.core.io.atomic_path``), so Snakemake never sees a half-written model.

transformers 5 no longer writes ``tokenizer.model`` or ``special_tokens_map.json`` from
``save_pretrained``; ``copy_tokenizer`` copies them from the source directory so that
SentencePiece-based tools (and people) still find them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike
from cptflow.model.loader import PICKLE_SUFFIXES

#: Tokenizer files copied verbatim from a tokenizer directory when present.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)


def load_tokenizer(path: PathLike) -> Any:
    """A fast tokenizer from a directory (``from_pretrained(dir)``: in transformers 5 constructing
    ``LlamaTokenizer(vocab_file=...)`` directly silently gives a 3-token tokenizer)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p}: tokenizer directory not found")
    return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False, local_files_only=True)


def raw_text_encoder(tokenizer: Any) -> Any:
    """A copy of the tokenizer's Rust backend that treats special-token strings in text as text.

    By default a literal "</s>" or "<s>" inside a document becomes EOS/BOS, so a web page could
    inject document boundaries; SentencePiece never does that. Use this for corpus text, with
    ``encode_batch_fast(texts, add_special_tokens=False)`` (3-5x faster than ``tokenizer(list)``).
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend


def copy_tokenizer(src_dir: PathLike, dst_dir: PathLike) -> list[str]:
    """Put the tokenizer of ``src_dir`` into ``dst_dir``; return the file names written.

    Files present in ``src_dir`` are copied byte for byte (so a model directory carries exactly the
    tokenizer it was built for); if ``src_dir`` has no tokenizer.json (a bare SentencePiece
    directory), the fast tokenizer's files are generated with ``save_pretrained`` first.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if not (src / "tokenizer.json").is_file():
        load_tokenizer(src).save_pretrained(str(dst))
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return sorted(n for n in TOKENIZER_FILES if (dst / n).is_file())


def link_or_copy(src: PathLike, dst: PathLike) -> None:
    """Hard-link ``src`` at a new path ``dst`` (same file system: instant, no second copy of a 26 GB
    model), else copy it. Safe because no cptflow stage ever writes into an existing file: every output
    is a new file renamed into place (``atomic_path``), which leaves the linked original untouched."""
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst}: exists; refusing to link over it")
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_model(model: Any, out_dir: PathLike) -> None:
    """Write ``model`` as config.json + safetensors (+ generation_config.json) into ``out_dir``."""
    model.save_pretrained(str(out_dir))
    stray = [f.name for f in Path(out_dir).iterdir() if f.suffix in PICKLE_SUFFIXES]
    if stray:  # never expected; guard the invariant that we only ever write safetensors
        raise RuntimeError(f"{out_dir}: save_pretrained wrote pickle files {stray}")

