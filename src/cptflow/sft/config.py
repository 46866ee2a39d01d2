"""The ``sft:`` config section: the branch's inputs and one sub-section per stage.

The family shares one section; each rule passes only its own sub-section to its stage (plus what it
needs from the top), so changing a training setting reruns ``finetune`` and what follows, not the
conversation checks::

    sft:
      sources: [{name: firefly, paths: [data/sft/*.jsonl], format: auto}]   # empty: no SFT branch
      start_from: null          # CPT stage whose model is fine-tuned; null = the last one
      conversations: {...}      # validation and decontamination
      sft_pack: {...}           # chat template, max_length
      finetune: {...}           # method (lora | qlora | full), LoRA rank/alpha/dropout, optimizer, batch
      generate: {...}           # the fixed prompts answered before and after SFT
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cptflow.core.config import ConfigError
from cptflow.train.config import ATTN, ENGINES, PRECISIONS, SCHEDULES

FORMATS = ("auto", "firefly", "sharegpt", "messages")
METHODS = ("lora", "qlora", "full")

# Read before and after SFT, so a person sees what instruction tuning changed. Fixed: the same prompts
# in every run make runs comparable. Everyday requests, none taken from a benchmark.
DEFAULT_PROMPTS = [
    "请用三句话介绍一下长城。",
    "怎样才能提高学习效率？请给出三条建议。",
    "把下面这句话翻译成英文：今天天气很好，我们去公园散步吧。",
    "写一首关于春天的短诗。",
    "What are three tips for staying focused while working from home?",
    "Explain in simple terms what a neural network is.",
    "Translate into Chinese: The library opens at nine in the morning.",
    "Write a short poem about the sea.",
]


@dataclass(frozen=True)
class SftSource:
    """One set of conversation files (JSON Lines)."""

    name: str  # source name: part of every conversation id (<name>/<file>:<line>)
    paths: list[str] = field(default_factory=list)  # glob patterns of .jsonl / .jsonl.gz files
    format: str = "auto"  # auto (by the keys of each line) | firefly | sharegpt | messages

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"sft.sources[{self.name}].format = {self.format!r}; allowed: {', '.join(FORMATS)}")


@dataclass(frozen=True)
class ConversationsConfig:
    """Stage ``conversations``: what makes a line bad, and decontamination."""

    decontaminate: bool = True  # drop conversations sharing a long n-gram with a benchmark question
    max_excerpt_chars: int = 200  # quarantine excerpt length
    max_bad_fraction: float = 1.0  # fail the file if a larger share of its lines is bad; 1.0 = never

    def __post_init__(self) -> None:
        if self.max_excerpt_chars < 0 or not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError("sft.conversations: max_excerpt_chars >= 0 and max_bad_fraction in [0, 1]")


@dataclass(frozen=True)
class SftPackConfig:
    """Stage ``sft_pack``: template, token budget per packed row."""

    # auto = the tokenizer's own chat_template, else Firefly's layout; firefly; or a path to a .jinja file
    chat_template: str = "auto"
    max_length: int = 2048  # tokens per packed row; a longer conversation is truncated at a turn boundary

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"sft.sft_pack.max_length must be >= 8, got {self.max_length}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage ``finetune``. Defaults follow Firefly's QLoRA recipe (r 64, alpha 16, dropout 0.05, clip 0.3)."""

    method: str = "lora"  # lora | qlora (4-bit NF4 base, GPU + bitsandbytes; else LoRA) | full
    lora_r: int = 64  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator: updates are scaled by alpha / r
    lora_dropout: float = 0.05  # dropout on the LoRA input
    # module names LoRA wraps; null = every linear layer except the output layer (peft's "all-linear")
    lora_target_modules: list[str] | None = None
    max_steps: int | None = None  # optimizer updates; null = `epochs` passes over the packed rows
    epochs: float = 1.0  # passes over the packed rows when max_steps is null
    lr: float = 2.0e-4  # peak learning rate
    min_lr: float = 0.0  # floor of cosine/linear decay
    warmup_steps: int = 0  # linear warmup updates; clamped to the run length with a warning
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0  # AdamW decoupled decay on matrices (0: the LoRA/QLoRA recipes use none)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1.0e-8  # AdamW epsilon
    grad_clip: float | None = 0.3  # max global grad norm (QLoRA's 0.3); null or 0 = no clipping
    micro_batch_size: int = 4  # packed rows per forward/backward per process
    grad_accum_steps: int | None = None  # micro-batches per update; null = from global_batch_size (or 1)
    global_batch_size: int | None = None  # rows per update over all processes; fix it to resume on another world
    precision: str = "bf16"  # fp32 | bf16 | fp16 (GPU): autocast; frozen LoRA base weights are held in it (ddp)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    # the training stage's kernels, engines and loss (cptflow.train): packed conversations never see each other
    attn: str = "auto"  # auto | sdpa | flex | varlen | eager (as train.attn)
    engine: str = "auto"  # auto (deepspeed when a json is named, else ddp) | ddp | fsdp | deepspeed (as train.engine)
    deepspeed: str | None = None  # a ZeRO json (e.g. config/deepspeed/zero2.json), or null
    fsdp_reshard_after_forward: bool = True  # fsdp: free gathered layer weights after forward
    compile: bool = False  # torch.compile each decoder layer (ddp/fsdp)
    loss_chunk_tokens: int = 1024  # lm_head + cross-entropy this many tokens at a time
    prefetch_batches: int = 2  # batches read ahead in a background thread
    seed: int = 42  # row order and every RNG (LoRA init, dropout)
    checkpoint_every: int = 200  # updates between checkpoints (one is always written at the end)
    keep_last: int = 2  # complete checkpoints kept; 0 keeps all
    log_every: int = 10  # updates between INFO log lines
    # the training loop's spike guard: skip an update whose loss > factor x the recent mean; null = off
    loss_spike_factor: float | None = 3.0
    loss_spike_window: int = 20  # accepted steps in that mean; the guard starts once it is full
    tensorboard: bool = True  # TensorBoard event files beside metrics.jsonl
    peak_tflops: float | None = None  # per-device peak for MFU (method full only); null = device table (GPU)

    def __post_init__(self) -> None:
        w = "sft.finetune"
        for key, allowed in (("method", METHODS), ("schedule", SCHEDULES), ("precision", PRECISIONS),
                             ("attn", ATTN), ("engine", ENGINES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{w}.{key} = {getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        for key in ("lora_r", "micro_batch_size", "checkpoint_every", "log_every", "loss_spike_window",
                    "loss_chunk_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{w}.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "grad_accum_steps", "global_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{w}.{key} must be >= 1 or null")
        if not 0.0 <= self.lora_dropout < 1.0 or self.lora_alpha <= 0 or self.epochs <= 0:
            raise ConfigError(f"{w}: need 0 <= lora_dropout < 1, lora_alpha > 0, epochs > 0")
        if not 0 <= self.min_lr <= self.lr or self.warmup_steps < 0 or self.keep_last < 0 or self.weight_decay < 0 \
                or self.prefetch_batches < 0:
            raise ConfigError(f"{w}: need 0 <= min_lr <= lr and warmup_steps, keep_last, weight_decay, "
                              "prefetch_batches >= 0")
        if self.loss_spike_factor is not None and self.loss_spike_factor <= 1:
            raise ConfigError(f"{w}.loss_spike_factor must be > 1 or null, got {self.loss_spike_factor}")
        if self.engine in ("ddp", "fsdp") and self.deepspeed is not None:
            raise ConfigError(f"{w}: engine {self.engine} with a deepspeed json; set engine: deepspeed (or auto)")
        if self.engine == "deepspeed" and self.deepspeed is None:
            raise ConfigError(f"{w}: engine deepspeed needs deepspeed: <ZeRO json>, e.g. config/deepspeed/zero2.json")
        if self.method == "qlora" and (self.engine == "fsdp" or self.deepspeed is not None):
            raise ConfigError(f"{w}: method qlora trains on one 4-bit copy per process: use engine ddp (or auto "
                              "without deepspeed); 4-bit weights are not sharded here")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"{w}.peak_tflops must be > 0 or null")

    @property
    def lora(self) -> bool:
        return self.method in ("lora", "qlora")


@dataclass(frozen=True)
class GenerateConfig:
    """Stage ``generate``: greedy answers to fixed prompts, from every model of the run."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 96  # per answer; greedy, so the same model gives the same text

    def __post_init__(self) -> None:
        if not self.prompts or self.max_new_tokens < 1:
            raise ConfigError("sft.generate: prompts must not be empty and max_new_tokens must be >= 1")


@dataclass(frozen=True)
class SftConfig:
    """The whole ``sft:`` section."""

    sources: list[SftSource] = field(default_factory=list)  # empty: the branch is off
    start_from: str | None = None  # train stage name; null = the last stage of train.stages
    conversations: ConversationsConfig = field(default_factory=ConversationsConfig)
    sft_pack: SftPackConfig = field(default_factory=SftPackConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
