"""Hugging Face model and tokenizer I/O shared by bootstrap, init_model and the later model stages.

Two rules hold everywhere a model directory is read or written:

* **No pickles, no remote code.** ``.bin``/``.pt`` checkpoints are Python pickles and can run code
  when loaded; a directory that only has those is refused with a message saying how to convert it.
  ``trust_remote_code`` is always off, so a config can only name architectures transformers ships.
* **Atomic directories.** A model directory is built in a temporary sibling and renamed on success
  (``cptflow.io.atomic_path``), so Snakemake never sees a half-written model.

transformers 5 no longer writes ``tokenizer.model`` or ``special_tokens_map.json`` from
``save_pretrained``; ``copy_tokenizer`` copies them from the source directory so that
SentencePiece-based tools (and people) still find them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from cptflow.io import PathLike

#: Weight files that are pickles: never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
#: Tokenizer files copied verbatim from a tokenizer directory when present.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` → ``torch.bfloat16``; only the three training dtypes are accepted."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def check_model_dir(path: PathLike) -> Path:
    """Return ``path`` if it holds config.json and safetensors weights; else raise ValueError.

    The error for a pickle-only directory names the files and the fix, because the usual cause is
    an old checkpoint, not a mistake in the config.
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ValueError(f"{p}: not a Hugging Face model directory (no config.json)")
    if any(p.glob("*.safetensors")):
        return p
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{p}: weights are pickle files ({', '.join(pickles)}); cptflow never unpickles weights "
            "(loading a pickle can run arbitrary code). Convert them once, in a trusted environment, "
            "with model.save_pretrained(dir, safe_serialization=True) and point base_model.path there."
        )
    raise ValueError(f"{p}: no *.safetensors weights found")


def load_causal_lm(path: PathLike, dtype: str | None = None) -> Any:
    """Load a causal LM from safetensors only; ``dtype=None`` keeps the dtype stored in the files."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(p),
        dtype=torch_dtype(dtype) if dtype else "auto",
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    model.eval()
    return model


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


def save_model(model: Any, out_dir: PathLike) -> None:
    """Write ``model`` as config.json + safetensors (+ generation_config.json) into ``out_dir``."""
    model.save_pretrained(str(out_dir))
    stray = [f.name for f in Path(out_dir).iterdir() if f.suffix in PICKLE_SUFFIXES]
    if stray:  # never expected; guard the invariant that we only ever write safetensors
        raise RuntimeError(f"{out_dir}: save_pretrained wrote pickle files {stray}")


def write_arrow_dataset(out_dir: PathLike, features: Any, shards: list[Any]) -> str:
    """Write a directory that ``datasets.load_from_disk`` opens, byte-identical for identical data.

    ``shards`` is a list of iterables of ``pyarrow.Table`` (one iterable per
    ``data-XXXXX-of-NNNNN.arrow`` file), consumed lazily so only one table is in memory at a time.
    ``Dataset.save_to_disk`` would write a random fingerprint into state.json for an in-memory
    dataset; here the fingerprint is the xxh3-64 of the arrow files, so it changes exactly when the
    data does. The JSON files follow the layout ``save_to_disk`` writes. Returns the fingerprint.
    """
    import json

    import xxhash
    from datasets import DatasetInfo
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.py_utils import asdict  # the serialiser save_to_disk uses (omits default fields)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = xxhash.xxh3_64()
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for name, tables in zip(names, shards):
        writer = ArrowWriter(features=features, path=str(out / name))
        try:
            for table in tables:
                writer.write_table(table)
            writer.finalize()
        finally:
            writer.close()
        with open(out / name, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    fingerprint = digest.hexdigest()
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = asdict(DatasetInfo(features=features))
    info = {k: info[k] for k in sorted(info)}  # first level only, as save_to_disk: nested order is meaningful
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return fingerprint
