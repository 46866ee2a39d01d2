"""What kind of tokenizer a base model has, and which ``vocab.method`` values can handle it.

Checked when the workflow starts (``workflow/rules/common.smk``), so that a base the chosen method
cannot expand fails before any data stage runs, with a message naming the file, the kind found and
the methods that apply, rather than as a ``FileNotFoundError`` in ``vocab`` hours later.

Kinds:

* ``sentencepiece``: a SentencePiece BPE ``tokenizer.model`` (LLaMA-1/2, Mistral-7B, the demo base).
  Pieces are appended to the model (``cptflow.tokenizer.sp_merge``).
* ``byte_bpe``: a ``tokenizer.json`` whose model is BPE over a ByteLevel pre-tokeniser (GPT-2, LLaMA-3,
  Qwen2.5, Mistral-Nemo, SmolLM2). New merges are learned on top (``cptflow.tokenizer.bpe_merges``).
* ``other``: anything else (a unigram or WordPiece model, a SentencePiece model converted to
  ``tokenizer.json`` without its ``tokenizer.model``, no tokenizer at all): only ``none`` applies.

A GGUF file is read for its metadata only (``tokenizer.ggml.model``: "llama" is SentencePiece-style,
"gpt2" byte-level BPE); nothing is dequantized, and the header is read only up to that key, so the check
costs milliseconds even for a 40 GB file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from cptflow.core.config import ConfigError
from cptflow.core.io import PathLike

SENTENCEPIECE, BYTE_BPE, OTHER = "sentencepiece", "byte_bpe", "other"
#: vocab.method values that can handle each kind, in the order the docs list them.
METHODS = {
    SENTENCEPIECE: ("sentencepiece", "top_chars", "both", "none"),
    BYTE_BPE: ("continued_bpe", "none"),
    OTHER: ("none",),
}
_GGUF_KINDS = {"llama": SENTENCEPIECE, "gpt2": BYTE_BPE}
_MAX_ITEMS = 1 << 31  # longest string / array a sane GGUF header holds; larger means a corrupt file


@dataclass(frozen=True)
class TokenizerKind:
    """The kind, the file it was read from, and what was found there (for messages and manifests)."""

    kind: str
    file: str
    detail: str


def methods_for(kind: str) -> tuple[str, ...]:
    """The ``vocab.method`` values that apply to a tokenizer ``kind``."""
    return METHODS[kind]


def _walk(node: object) -> list[dict]:
    """Every dict with ``"type"`` in a tokenizer.json component, including inside Sequences."""
    if isinstance(node, dict):
        found = [node] if "type" in node else []
        for v in node.values():
            found += _walk(v)
        return found
    if isinstance(node, list):
        return [d for v in node for d in _walk(v)]
    return []


def json_kind(path: PathLike, data: dict | None = None) -> TokenizerKind:
    """Classify a ``tokenizer.json`` (``data``: its parsed content, if already read)."""
    p = str(path)
    if data is None:
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: not a readable tokenizer.json ({e})") from e
    model = data.get("model") or {}
    mtype = model.get("type")
    byte_level = any(d.get("type") == "ByteLevel" for d in _walk(data.get("pre_tokenizer")))
    if mtype != "BPE":
        return TokenizerKind(OTHER, p, f"{mtype or 'unknown'} model")
    if not byte_level:
        return TokenizerKind(OTHER, p, "BPE without a ByteLevel pre-tokenizer (a converted SentencePiece model?)")
    odd = [k for k in ("continuing_subword_prefix", "end_of_word_suffix") if model.get(k)]
    if odd or model.get("dropout") or model.get("byte_fallback"):
        return TokenizerKind(OTHER, p, f"byte-level BPE with {', '.join(odd) or 'dropout/byte_fallback'} set")
    return TokenizerKind(BYTE_BPE, p, f"byte-level BPE, {len(model.get('vocab') or {})} tokens")


def sentencepiece_kind(path: PathLike) -> TokenizerKind | None:
    """Classify a ``tokenizer.model``; None if it is not a SentencePiece model (e.g. a tiktoken file)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(Path(path).read_bytes())
    except DecodeError:
        return None
    if not m.pieces:
        return None
    mtype = pb.TrainerSpec.ModelType.Name(m.trainer_spec.model_type)
    if m.trainer_spec.model_type != pb.TrainerSpec.BPE:
        return TokenizerKind(OTHER, str(path), f"SentencePiece {mtype} model (pieces cannot be appended)")
    return TokenizerKind(SENTENCEPIECE, str(path), f"SentencePiece BPE, {len(m.pieces)} pieces")


def _gguf_value(f, vtype: int):
    """Read one GGUF value of type ``vtype`` (gguf.GGUFValueType) from ``f``."""
    from gguf import GGUFValueType as T

    scalar = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
              T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
    vtype = T(vtype)
    if vtype == T.STRING:
        (n,) = _read(f, "<Q")
        if n > _MAX_ITEMS:
            raise EOFError  # a corrupt length: do not try to allocate it
        raw = f.read(n)
        if len(raw) != n:
            raise EOFError
        return raw.decode("utf-8", errors="replace")
    if vtype == T.ARRAY:
        item, n = _read(f, "<I")[0], _read(f, "<Q")[0]
        if n > _MAX_ITEMS:
            raise EOFError
        return [_gguf_value(f, item) for _ in range(n)]
    return _read(f, scalar[vtype])[0]


def _read(f, fmt: str) -> tuple:
    raw = f.read(struct.calcsize(fmt))
    if len(raw) != struct.calcsize(fmt):
        raise EOFError
    return struct.unpack(fmt, raw)


def gguf_metadata(path: PathLike, key: str) -> object:
    """The value of one metadata ``key`` of a GGUF file, reading the header only up to that key.

    Raises ValueError naming the file if it is not GGUF, is truncated, or lacks the key.
    """
    import gguf

    p = str(path)
    try:
        with open(p, "rb") as f:
            magic, version = _read(f, "<II")
            if magic != gguf.GGUF_MAGIC:
                raise ValueError(f"{p}: not a GGUF file (magic {magic:#x})")
            if version < 2:
                raise ValueError(f"{p}: GGUF version {version} is too old (need 2 or later)")
            _tensors, n_kv = _read(f, "<QQ")
            for _ in range(n_kv):
                name = _gguf_value(f, gguf.GGUFValueType.STRING)
                (vtype,) = _read(f, "<I")
                value = _gguf_value(f, vtype)
                if name == key:
                    return value
    except EOFError:
        raise ValueError(f"{p}: truncated or corrupt GGUF file (its metadata header ends early)") from None
    raise ValueError(f"{p}: GGUF metadata has no {key!r}")


def detect_kind(path: PathLike) -> TokenizerKind:
    """The tokenizer kind of a base: a Hugging Face model or tokenizer directory, or a ``.gguf`` file.

    A directory is SentencePiece if its ``tokenizer.model`` is a SentencePiece BPE model (LLaMA-2
    folders ship a ``tokenizer.json`` too; the ``.model`` is the source of truth), else it is
    classified by its ``tokenizer.json``.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        model = gguf_metadata(p, "tokenizer.ggml.model")
        kind = _GGUF_KINDS.get(str(model), OTHER)
        return TokenizerKind(kind, str(p), f"GGUF tokenizer.ggml.model = {model!r}")
    if not p.is_dir():
        raise ValueError(f"{p}: no such directory or .gguf file")
    sp, tj = p / "tokenizer.model", p / "tokenizer.json"
    if sp.is_file():
        found = sentencepiece_kind(sp)
        if found is not None and (found.kind == SENTENCEPIECE or not tj.is_file()):
            return found
    if tj.is_file():
        return json_kind(tj)
    if sp.is_file():
        return TokenizerKind(OTHER, str(sp), "not a SentencePiece model (a tiktoken file?), and no tokenizer.json")
    return TokenizerKind(OTHER, str(p), "no tokenizer.model or tokenizer.json")


def check_vocab_method(method: str, base_path: PathLike | None, bootstrap_tokenizer: PathLike | None = None,
                       ) -> TokenizerKind:
    """Fail with a ConfigError unless ``vocab.method`` can handle the base's tokenizer.

    ``base_path`` is ``base_model.path``; when it is None the base is bootstrapped over
    ``bootstrap_tokenizer`` (``base_model.bootstrap.tokenizer``), which must be SentencePiece.
    """
    where = base_path if base_path is not None else bootstrap_tokenizer
    label = (f"base_model.path {where}" if base_path is not None
             else f"the bootstrapped base (base_model.bootstrap.tokenizer {where})")
    try:
        found = detect_kind(where)
    except ValueError as e:
        raise ConfigError(f"config: {label}: {e}") from e
    if base_path is None and found.kind != SENTENCEPIECE:
        raise ConfigError(f"config: {label} needs a SentencePiece BPE tokenizer.model, found {found.kind} "
                          f"({found.file}: {found.detail})")
    if method not in methods_for(found.kind):
        raise ConfigError(
            f"config: vocab.method {method!r} cannot handle {label}: its tokenizer is {found.kind} "
            f"({found.file}: {found.detail}); methods that apply: {', '.join(methods_for(found.kind))}")
    return found
