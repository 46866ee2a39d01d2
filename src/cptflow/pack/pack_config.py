"""Settings of the pack family (config section ``pack:``): ``pack_encoder``'s special ids, ``pack_shard``'s
sample length, boundaries and tail; ``pack``'s mixture (bins, weights, replay). Each rule gets only the
keys its output depends on (``ENCODER_KEYS``, ``SHARD_KEYS``, ``LAYOUT_KEYS``), so changing a weight
re-indexes without re-tokenizing."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from cptflow.core.config import ConfigError


TAILS = ("drop", "pad")
# What a pack shard depends on (batch_docs only bounds memory, but a user who sets it means it to reach the jobs).
SHARD_KEYS = ("max_length", "add_bos", "add_eos", "tail", "pad_token_id", "batch_docs")
LAYOUT_KEYS = ("max_length", "num_bins", "seed", "categories", "replay")  # what the index depends on
ENCODER_KEYS = ("add_bos", "add_eos", "pad_token_id")  # what pack_encoder's special ids depend on


@dataclass(frozen=True)
class ReplayConfig:
    """English replay: a fixed share of the final rows, whatever the other categories add up to."""

    category: str = "en_replay"  # category name as given to --shards
    share: float = 0.1  # fraction of each bucket's rows (and tokens) that are replay, in [0, 1)


@dataclass(frozen=True)
class PackConfig:
    """Sample length, document boundaries, tail handling and the category mixture."""

    max_length: int = 2048  # tokens per sample (row)
    add_bos: bool = True  # BOS at each document start
    add_eos: bool = True  # EOS at each document end
    tail: str = "pad"  # last partial row of a shard: pad (keep, pad to max_length) | drop
    pad_token_id: int | None = None  # id used for padding; null = the tokenizer's EOS
    num_bins: int = 10  # bins per category = buckets in the output
    seed: int = 0  # run seed for every shuffle and subsample
    categories: dict[str, float] = field(default_factory=dict)  # name -> weight; {} = all given, weight 1
    # Optional[...] rather than `| None`: cptflow.core.config.from_dict builds nested dataclasses inside
    # typing.Union but (as of writing) not inside a PEP 604 `X | None` union.
    replay: Optional[ReplayConfig] = None  # replay category and share; null = no replay
    num_threads: int = 0  # tokenizer threads (RAYON_NUM_THREADS); 0 = the tokenizers default (all cores)
    batch_docs: int = 1000  # documents read and tokenized at a time (bounds a pack_shard job's memory)

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError("pack.max_length must be >= 2")
        if self.tail not in TAILS:
            raise ConfigError(f"pack.tail must be one of {', '.join(TAILS)}, got {self.tail!r}")
        if self.num_bins < 1 or self.batch_docs < 1 or self.num_threads < 0:
            raise ConfigError("pack: num_bins and batch_docs must be >= 1 and num_threads >= 0")
        for name, w in self.categories.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"pack.categories.{name}: weight must be a number >= 0, got {w!r}")
        if self.replay is not None:
            if not 0 <= self.replay.share < 1:
                raise ConfigError("pack.replay.share must be in [0, 1)")
            if self.replay.category in self.categories:
                raise ConfigError(f"pack.replay.category {self.replay.category!r} must not also be in "
                                  "pack.categories: its amount is set by replay.share")


def section_params(section: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The given keys of a ``pack:`` section, defaults filled in (a rule's params: it reruns when they change)."""
    from cptflow.core.config import from_dict

    cfg = asdict(from_dict(PackConfig, dict(section), "pack"))
    return {k: cfg[k] for k in keys}
