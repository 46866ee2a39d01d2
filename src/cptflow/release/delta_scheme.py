"""The delta scheme shared by ``delta_make`` and ``delta_apply``: what a delta directory holds and how bits combine.

LLaMA-derived weights are often not ours to redistribute, so we publish ``delta = adapted ⊖ base``;
a user who holds the base rebuilds the adapted model with ``apply``, and the DESIGN invariant says
``apply(base, make(base, adapted)) == adapted`` byte for byte, proven by sha256.

Numeric scheme — XOR of bit patterns. A float difference (``adapted - base`` in bf16/fp16, even in
fp32) is rounded, so ``base + (adapted - base)`` does not give ``adapted`` back. We view both tensors
as unsigned/signed integers of the same width (bf16/fp16 → int16, fp32 → int32, fp64 → int64, 1-byte
types → uint8) and store ``adapted_bits XOR base_bits``. XOR is defined for every width with no
overflow semantics to rely on (an integer difference would need wrap-around), is its own inverse,
and for weights that moved a little it keeps sign, exponent and high mantissa bits at zero, so the
delta compresses well. Rows the base lacks (embed_tokens / lm_head rows of the expanded vocabulary,
or whole tensors the base does not have) are XORed with nothing, i.e. stored whole. When the base
tensor has another dtype than the adapted one it is first cast to the adapted dtype (deterministic).

Byte identity of the files: a safetensors file is ``<u64 header length><JSON header><tensor bytes>``;
its bytes depend on the header's key order, metadata and padding, which differ between writers. We
store each adapted shard's raw header verbatim (``layout/<shard>.header``) and write tensor bytes at
its offsets, so the output does not depend on the safetensors version. Every other file of the
adapted directory (config, tokenizer, index) is copied as is. ``manifest.json`` holds the sha256 of
every adapted file and of the base's files; apply refuses a base whose weight files differ and
checks every output file before renaming the directory into place.

Delta directory: ``manifest.json``, ``delta.safetensors.index.json``, ``delta-0000i-of-0000n.safetensors``
(integer tensors named as the adapted ones), the adapted model's config/tokenizer files, ``layout/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from cptflow.core.config import ConfigError
from cptflow.core.stats import Stats, write_manifest
from cptflow.model.safetensors_io import ST_DTYPES

FORMAT = "cptflow-delta"


SCHEME = "xor-bits"


MANIFEST = "manifest.json"


DELTA_INDEX = "delta.safetensors.index.json"


LAYOUT = "layout"


FORMAT_VERSION = 1  # of the delta directory layout; apply reads every version up to this one
BIT_TYPES = {1: "U8", 2: "I16", 4: "I32", 8: "I64"}  # same-width integer views for XOR


@dataclass(frozen=True)
class DeltaConfig:
    max_shard_mb: int = 5000  # largest delta (or fastchat output) shard, MB of 10^6 bytes as Hugging Face counts
    verify_base: bool = True  # apply: compare the base's weight files with the sha256 in the manifest first
    fastchat_dtype: str = "float16"  # apply --format fastchat: dtype of the written weights (float16|bfloat16|float32)

    def __post_init__(self) -> None:
        if self.max_shard_mb < 1:
            raise ConfigError("delta.max_shard_mb must be >= 1")
        if self.fastchat_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"delta.fastchat_dtype {self.fastchat_dtype!r}: use float16, bfloat16 or float32")


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The same bytes viewed as an integer type of the same width."""
    return t.contiguous().view(ST_DTYPES[BIT_TYPES[t.element_size()]])


def xor_bits(x_bits: torch.Tensor, base: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``x_bits`` XOR the bits of ``base`` cast to ``dtype``; rows beyond the base's (all, without a base) pass as is.

    Used both ways: make (x = adapted bits → delta) and apply (x = delta → adapted bits).
    """
    if base is None:
        return x_bits.clone()
    bb = bits_of(base.to(dtype))
    if bb.shape == x_bits.shape:
        return torch.bitwise_xor(x_bits, bb)
    out = x_bits.clone()
    out[: bb.shape[0]].bitwise_xor_(bb)  # in place: no fourth tensor-sized temporary
    return out


def check_compatible(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...], where: str) -> None:
    """Same shape, or more rows (expanded vocabulary) with the other dims equal."""
    if shape == base_shape:
        return
    if len(shape) == len(base_shape) >= 1 and shape[1:] == base_shape[1:] and shape[0] > base_shape[0]:
        return
    raise ValueError(f"tensor {name}: shape {list(shape)} does not extend the base's {list(base_shape)} "
                     f"({where}): wrong base model?")


def digest(file_shas: dict[str, str]) -> str:
    """Directory digest from per-file sha256: ``cptflow.core.io.sha256_path`` of those files, without reading them again."""
    h = hashlib.sha256()
    for rel in sorted(file_shas):
        h.update(rel.encode() + b"\0" + file_shas[rel].encode())
    return h.hexdigest()


def stored_name(rel: str) -> str:
    """Where a copied adapted file lives in the delta: top level (config, tokenizer), else under layout/."""
    reserved = (rel in (MANIFEST, DELTA_INDEX, LAYOUT) or rel.startswith("delta")
                or rel.endswith(".safetensors.index.json"))
    return f"{LAYOUT}/files/{rel}" if "/" in rel or reserved else rel


def write_release_manifest(path: str, *, stage: str, version: int, cfg: DeltaConfig, stats: Stats, seconds: float,
                           inputs: dict[str, str], outputs: dict[str, str], fallback_inputs: list[str]) -> None:
    """The stage manifest, with the directory digests computed while working (multi-GB models are not read
    again); ``fallback_inputs`` are hashed only when no digest was computed (fastchat apply)."""
    from cptflow.core.config import to_dict

    write_manifest(path, stage=stage, version=version, params=to_dict(cfg), inputs=[] if inputs else fallback_inputs,
                   stats=stats, seconds=seconds, extra={"outputs": outputs, **({"inputs": inputs} if inputs else {})})
