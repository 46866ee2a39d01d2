"""Throughput, model FLOPs utilisation, and the per-step metrics log (JSONL + TensorBoard).

MFU = (6·N + 12·L·H·T) · tokens/s / peak FLOP/s (PaLM, appendix B; DESIGN.md), with N the
parameters that do a matmul per token — the transformer body *and lm_head* (V·H: 13.0 % of the
FLOPs of bench/gpu.py's 1 B model, 16 x 2048 with a 72 k vocabulary at T 4096; 3.8 % at LLaMA-2-7B's
shape) — but not the input embedding, which is a lookup; L layers, H hidden size, T sequence
length. 6·N counts the forward and backward matmuls of the weights, 12·L·H·T the attention scores
and values over the full sequence (the convention: document masks and
causality make the kernels do less, so this overstates the attention work, as PaLM's and nanoGPT's
figures do). tokens/s counts real (non-padding) tokens only and leaves out the time spent writing
checkpoints (``Throughput.excluded``). The peak comes from the stage config
(``peak_tflops``) or from ``PEAK_TFLOPS`` by device name, never from a constant in the code path:
a wrong peak silently scales every MFU number. On CPU there is no meaningful peak, so MFU is None.

The convention counts model FLOPs of a full update even when only the embeddings train
(``trainable: embeddings_only``): MFU then reads low, which is what it should say.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike, dumps_record

log = logging.getLogger("cptflow.train.metrics")

# Dense (no sparsity) tensor-core peak per device in TFLOP/s for 16-bit inputs (bf16/fp16), from the
# vendors' data sheets. Matched by substring of torch.cuda.get_device_name(), first match wins, so
# the more specific names come first. fp32 training has no entry: TF32 and plain fp32 differ by 8-16x
# and depend on flags, so MFU needs an explicit peak_tflops there.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),  # fp16 only
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def peak_flops(device_name: str | None, precision: str, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ONE device, or None when unknown (then MFU is not reported).

    ``peak_tflops`` from the config wins; otherwise the table is used for bf16/fp16 on a GPU.
    """
    if peak_tflops is not None:
        return float(peak_tflops) * 1e12
    if not device_name or precision not in ("bf16", "fp16"):
        return None
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def flops_per_token(n_matmul: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·T (forward + backward); N includes lm_head."""
    return 6.0 * n_matmul + 12.0 * n_layers * hidden * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_per_device: float | None, n_devices: int) -> float | None:
    """Fraction of the devices' peak that the model's FLOPs use; None without a known peak."""
    if not peak_per_device or n_devices < 1:
        return None
    return tokens_per_s * flops_token / (peak_per_device * n_devices)


class Throughput:
    """Tokens/s over the last completed step, and an ETA from the mean over the run so far.

    Time spent inside ``excluded()`` (checkpoint saves) counts for neither: it is not training work,
    and a save every N steps would otherwise make every N-th step look slow.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last = self.start
        self.tokens_total = 0
        self.steps_total = 0
        self.excluded_s = 0.0

    def step(self, tokens: int) -> float:
        now = time.perf_counter()
        dt = max(now - self.last, 1e-9)
        self.last = now
        self.tokens_total += tokens
        self.steps_total += 1
        return tokens / dt

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.last += dt  # the next step's interval starts after the excluded time
            self.excluded_s += dt

    def elapsed_s(self) -> float:
        return max(self.last - self.start - self.excluded_s, 1e-9)

    def mean_tokens_per_s(self) -> float:
        return self.tokens_total / self.elapsed_s()

    def eta_s(self, steps_left: int) -> float:
        if not self.steps_total:
            return float("nan")
        return steps_left * self.elapsed_s() / self.steps_total


class MetricsLog:
    """Rank 0's per-step record: kept in memory, appended live to a JSONL, mirrored to TensorBoard.

    On resume ``rows`` comes from the checkpoint and the live file is rewritten from it, so rows the
    dead run logged after its last checkpoint vanish; TensorBoard's ``purge_step`` drops them from
    the event files the same way.
    """

    def __init__(self, live_path: PathLike, rows: Iterable[dict[str, Any]] = (), tb_dir: PathLike | None = None):
        self.rows = list(rows)
        self.live_path = Path(live_path)
        self.live_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.live_path, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(dumps_record(r) + "\n")
        self.tb = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is a dependency; import only when used

            purge = self.rows[-1]["step"] + 1 if self.rows else None
            self.tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.live_path, "a", encoding="utf-8") as f:
            f.write(dumps_record(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):  # bools (skipped) plot as 0/1
                    self.tb.add_scalar(f"train/{k}", float(v), row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


def read_rows(path: PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL (checkpoint copy or final file)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def peak_memory_gib(device: Any) -> float | None:
    """Peak memory allocated by torch on a CUDA device so far (GiB); None on CPU (no allocator statistics)."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
