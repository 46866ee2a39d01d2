"""Config of the training stages: the ``train:`` section and one ``TrainStageConfig`` per stage.

The section holds settings common to all stages plus a ``stages`` list whose entries override them:

    train:
      micro_batch_size: 8          # common: applies to every stage unless the stage says otherwise
      precision: bf16
      stages:
        - {name: embed_align, trainable: embeddings_only, lr: 1.0e-3, buckets: [0]}
        - {name: full}

``resolve_stage(section, name)`` merges the two into the flat dict that the rule passes to
``cptflow.train.train`` as ``--params`` and that ``TrainStageConfig`` is built from. Stage entries carry no
defaults in the schema on purpose: a default there would mask the common setting.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from cptflow.core.config import ConfigError, from_dict

SCHEDULES = ("cosine", "linear", "constant")
TRAINABLE = ("all", "embeddings_only", "new_embeddings_only")
PRECISIONS = ("fp32", "bf16", "fp16")
ATTN = ("auto", "sdpa", "flex", "varlen", "eager")  # cptflow.train.attention.KERNELS
ENGINES = ("auto", "ddp", "fsdp", "deepspeed")  # cptflow.train.engines.ENGINES


@dataclass(frozen=True)
class TrainStageConfig:
    name: str = "train"  # stage name: results/<run>/train/<name>/; unique within the section
    # --- data: which packed samples, in pack's bucket order, shuffled within buckets by seed
    categories: list[str] | None = None  # categories to train on; null = all in the data
    buckets: list[int] | None = None  # pack buckets to train on (kept in ascending order); null = all
    max_steps: int | None = None  # optimizer updates; null = from max_tokens, else one pass over the selection
    # token budget (positions incl. padding): steps = ceil(max_tokens / (global_batch * length))
    max_tokens: int | None = None
    # --- optimizer and schedule (AdamW; lr is a pure function of the step, cptflow.train.schedule)
    lr: float = 2.0e-4  # peak learning rate after warmup
    min_lr: float = 2.0e-5  # floor of cosine/linear decay (10% of lr, a common CPT choice)
    warmup_steps: int = 100  # linear warmup updates; clamped to the stage length with a warning
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # decoupled decay on matrices only (not norms/biases)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas; 0.95 is the LLaMA pre-training choice
    eps: float = 1.0e-8  # AdamW epsilon
    grad_clip: float | None = 1.0  # max global grad norm; null or 0 = no clipping (norm still logged)
    trainable: str = "all"  # all | embeddings_only (embed_tokens + lm_head, body frozen) | new_embeddings_only
    # --- batch: global_batch = micro_batch_size * grad_accum_steps * world_size
    micro_batch_size: int = 4  # samples per forward/backward per process
    grad_accum_steps: int | None = None  # micro-batches per update; null = derived from global_batch_size (or 1)
    # samples per update over all processes; fix it to resume on another number of processes
    global_batch_size: int | None = None
    max_length: int | None = None  # expected sample length; null = take it from the data (a mismatch is an error)
    seed: int = 1234  # seeds the within-bucket shuffle and every RNG
    # --- numerics and kernels
    precision: str = "bf16"  # fp32 | bf16 | fp16 (fp16 GPU only); autocast with fp32 master weights, or DeepSpeed
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # packed-document attention: auto (GPU bf16/fp16: varlen with flash-attn installed, else flex; CPU: sdpa)
    attn: str = "auto"  # | sdpa | flex | varlen | eager
    compile: bool = False  # torch.compile each decoder layer (ddp/fsdp); worth it on GPU, slow to start on CPU
    loss_chunk_tokens: int = 1024  # lm_head + cross-entropy this many tokens at a time: the full logits never exist
    engine: str = "auto"  # auto (deepspeed when a json is named, else ddp) | ddp | fsdp | deepspeed
    deepspeed: str | None = None  # null = no DeepSpeed; or a ZeRO json, e.g. config/deepspeed/zero2.json (GPU)
    fsdp_reshard_after_forward: bool = True  # fsdp: free gathered layer weights after forward (ZeRO-3-like)
    prefetch_batches: int = 2  # batches read ahead in a background thread; 0 = read inside the step
    # --- checkpoints, logs, safety
    checkpoint_every: int = 500  # updates between checkpoints (one is always written at the end)
    keep_last: int = 2  # complete checkpoints kept; 0 keeps all
    log_every: int = 10  # updates between INFO log lines (metrics.jsonl gets every step)
    # skip an update whose loss > factor * mean of the recent accepted losses; null = off
    loss_spike_factor: float | None = 3.0
    loss_spike_window: int = 20  # accepted steps in that mean; the guard starts once it is full
    tensorboard: bool = True  # write TensorBoard event files next to metrics.jsonl
    peak_tflops: float | None = None  # per-device peak for MFU; null = device table (GPU), none on CPU

    def __post_init__(self) -> None:
        w = f"train stage {self.name!r}"
        choices = {"schedule": SCHEDULES, "trainable": TRAINABLE, "precision": PRECISIONS, "attn": ATTN,
                   "engine": ENGINES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{w}: {key} = {getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        for key in ("micro_batch_size", "checkpoint_every", "log_every", "loss_spike_window", "loss_chunk_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{w}: {key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "max_tokens", "grad_accum_steps", "global_batch_size", "max_length"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{w}: {key} must be >= 1 or null, got {v}")
        if self.max_steps is not None and self.max_tokens is not None:
            raise ConfigError(f"{w}: set max_steps or max_tokens, not both")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{w}: need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0 or self.keep_last < 0 or self.weight_decay < 0 or self.prefetch_batches < 0:
            raise ConfigError(f"{w}: warmup_steps, keep_last, weight_decay and prefetch_batches must be >= 0")
        if self.engine in ("ddp", "fsdp") and self.deepspeed is not None:
            raise ConfigError(f"{w}: engine {self.engine} with a deepspeed json; set engine: deepspeed (or auto)")
        if self.engine == "deepspeed" and self.deepspeed is None:
            raise ConfigError(f"{w}: engine deepspeed needs deepspeed: <ZeRO json>, e.g. config/deepspeed/zero2.json")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{w}: betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.loss_spike_factor is not None and self.loss_spike_factor <= 1:
            raise ConfigError(f"{w}: loss_spike_factor must be > 1 or null, got {self.loss_spike_factor}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"{w}: peak_tflops must be > 0 or null")

    def batch_layout(self, world_size: int) -> tuple[int, int]:
        """(grad_accum_steps, global_batch_size) for ``world_size`` processes; errors say what to change."""
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size is None:
            accum = self.grad_accum_steps or 1
            return accum, per_pass * accum
        if self.global_batch_size % per_pass:
            raise ConfigError(f"train stage {self.name!r}: global_batch_size {self.global_batch_size} is not a "
                              f"multiple of micro_batch_size * world_size = {per_pass}")
        accum = self.global_batch_size // per_pass
        if self.grad_accum_steps is not None and self.grad_accum_steps != accum:
            raise ConfigError(f"train stage {self.name!r}: grad_accum_steps {self.grad_accum_steps} disagrees with "
                              f"global_batch_size {self.global_batch_size} on {world_size} processes ({accum}); "
                              "set only one of them")
        return accum, self.global_batch_size


STAGE_FIELDS = [f for f in dataclasses.fields(TrainStageConfig) if f.name != "name"]

# The section: every stage field as a common default, plus the list of stages.
TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(f.name, f.type, field(default=f.default)) for f in STAGE_FIELDS]
    + [("stages", list[dict[str, Any]], field(default_factory=lambda: [
        {"name": "embed_align", "trainable": "embeddings_only", "lr": 1.0e-3, "min_lr": 1.0e-4, "buckets": [0]},
        {"name": "full"},
    ]))],
    frozen=True,
)
TrainConfig.__module__ = __name__  # so string annotations resolve here (from_dict uses get_type_hints)
TrainConfig.__doc__ = "The ``train:`` section: common stage settings plus ``stages`` (each overrides them)."


def stage_names(section: dict[str, Any]) -> list[str]:
    """Stage names in order (the train/<name> DAG chain); duplicates and missing names are errors."""
    stages = section.get("stages", TrainConfig().stages)
    names = []
    for i, st in enumerate(stages):
        if "name" not in st:
            raise ConfigError(f"train.stages[{i}]: missing name")
        if st["name"] in names:
            raise ConfigError(f"train.stages[{i}]: duplicate stage name {st['name']!r}")
        names.append(st["name"])
    return names


def resolve_stage(section: dict[str, Any], name: str) -> dict[str, Any]:
    """The flat params of stage ``name``: common settings overridden by the stage's own entry."""
    stage_names(section)
    common = {k: v for k, v in section.items() if k != "stages"}
    stages = section.get("stages", TrainConfig().stages)
    entry = next((s for s in stages if s["name"] == name), None)
    if entry is None:
        raise ConfigError(f"train.stages: no stage named {name!r}; have {stage_names(section)}")
    merged = {f.name: f.default for f in STAGE_FIELDS}
    merged.update(common)
    merged.update(entry)
    from_dict(TrainStageConfig, merged, f"train.stages[{name}]")  # check now, in the workflow process
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in merged.items()}


def plan_steps(cfg: TrainStageConfig, n_samples: int, length: int, global_batch: int) -> int:
    """Updates in the stage: max_steps, else the token budget, else one pass over the selection."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.max_tokens is not None:
        return math.ceil(cfg.max_tokens / (global_batch * length))
    if n_samples < global_batch:
        raise ValueError(f"stage {cfg.name}: {n_samples} selected samples, "
                         f"fewer than one global batch ({global_batch})")
    return n_samples // global_batch
