"""What each model stage needs — memory, threads, time — for a model of a given size and dtype.

Snakemake's resource functions (workflow/rules/common.smk, ``model_resources``) call ``stage_resources``
with the size of the model the job reads (``model_size``: safetensors headers and config.json, or a
GGUF tensor table; no torch), so a SLURM job asks for what a 13B base needs and a demo job for what a
4 M one needs. The README's table of 1B / 7B / 13B bases is this function's output
(``python -m cptflow.model.sizing``; tests/model/test_sizing.py keeps the two equal).

The formulas are budgets for a scheduler request, from what each stage holds at its peak
(P parameters, b bytes per stored parameter, E elements of the largest tensor — the embedding):

* every process: ``OVERHEAD_MB`` for Python, torch and transformers (measured ~0.7 GB RSS);
* base_model: headers and a meta-device model (+3 E float32 when converting dtype, tensor by tensor);
  GGUF: transformers dequantizes the whole file, ~2 x P float32 at once (measured 1.13 GB peak for
  SmolLM2-135M, budget 2.0 GB);
* init_model: the model as stored (P b) plus float32 work copies of the embedding matrices (6 E x 4);
* train (one CPU process, fp32 master weights + AdamW): 16 P (weights, gradients, two moments) plus a
  quarter for activations; on GPUs this is per-GPU memory under DDP, divided by the GPU count under ZeRO-3;
* evaluate: the model in float32 on CPU (bfloat16 on GPU), one layer's activations of a batch at full
  context (batch x context x (8 hidden + heads x context) float32: the attention scores of SDPA's math
  path are the big term) and the vocabulary projection, which cptflow.eval runs 256 positions at a time;
* delta_make / delta_apply: stream tensor by tensor: 4 copies of the largest tensor.

Times assume 200 MB/s of file I/O (a busy network file system) and, for evaluation, the demo's
question caps; full benchmarks on CPU take far longer, which is why ``evaluate`` gets a GPU on SLURM.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cptflow.core.io import PathLike
from cptflow.model.safetensors_header import ST_SIZES, stored_float_dtype, tensor_index

MB = 1 << 20
OVERHEAD_MB = 1024  # python + torch + transformers in one process (measured ~700 MB RSS), with headroom
IO_BYTES_PER_S = 200e6  # file I/O assumed for time budgets (busy network file system)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STAGES = ("base_model", "init_model", "train", "evaluate", "delta_make", "delta_apply")


@dataclass(frozen=True)
class ModelSize:
    """What the resource formulas need to know about a model."""

    n_params: int = 0  # parameters stored (a tied matrix once)
    bytes_per_param: int = 4  # of the stored dtype, which every stage output keeps
    largest_tensor: int = 0  # elements of the largest tensor (the embedding, usually)
    vocab_size: int = 0
    max_positions: int = 2048
    hidden_size: int = 0
    num_heads: int = 0
    gguf: bool = False  # a GGUF file, to be dequantized

    @property
    def weight_bytes(self) -> int:
        return self.n_params * self.bytes_per_param


def model_size(path: PathLike, dtype: str = "auto") -> ModelSize:
    """The size of a model directory (safetensors headers + config.json) or GGUF file; reads no weights.

    ``dtype`` is the configured output dtype (base_model.dtype): GGUF is dequantized to float32 unless set.
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        import gguf

        tensors = list(gguf.GGUFReader(str(p)).tensors)
        return ModelSize(sum(int(t.n_elements) for t in tensors), DTYPE_BYTES.get(dtype, 4),
                         max(int(t.n_elements) for t in tensors), gguf=True)
    tensors = [t for _, t in tensor_index(p).values()]
    cfg = json.loads((p / "config.json").read_text(encoding="utf-8")) if (p / "config.json").is_file() else {}
    stored = stored_float_dtype(tensors, str(p))
    return ModelSize(sum(t.numel for t in tensors), DTYPE_BYTES.get(dtype, ST_SIZES[_st_name(stored)]),
                     max(t.numel for t in tensors), int(cfg.get("vocab_size") or 0),
                     int(cfg.get("max_position_embeddings") or 2048), int(cfg.get("hidden_size") or 0),
                     int(cfg.get("num_attention_heads") or 0))


def _st_name(dtype: str) -> str:
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]


def _mb(n_bytes: float) -> int:
    return int(math.ceil(n_bytes / MB))


def _round_mb(mb: float) -> int:
    return int(math.ceil(mb / 100.0) * 100)  # whole hundreds: readable requests, a little headroom


def _minutes(n_bytes: float, passes: float, floor: int = 10) -> int:
    return int(floor + math.ceil(passes * n_bytes / IO_BYTES_PER_S / 60))


def stage_resources(stage: str, size: ModelSize, *, gpu: bool = False, batch_size: int = 8,
                    context: int = 0, convert: bool = False) -> dict[str, int]:
    """``{"mem_mb", "threads", "runtime"}`` (host MiB, cores, minutes) and, for train and evaluate,
    ``gpu_mem_mb`` (one GPU, DDP / inference) for ``stage`` on a model of ``size``.

    ``convert``: base_model rewrites the tensors in another dtype; ``context``: evaluation tokens per
    sequence (0: the model's positions, at most 4096); ``gpu``: evaluate runs on a GPU.
    """
    P, b, E = size.n_params, size.bytes_per_param, size.largest_tensor
    if stage == "base_model":
        if size.gguf:
            return {"mem_mb": _round_mb(OVERHEAD_MB + _mb(2 * 4 * P)), "threads": 1,
                    "runtime": 10 + math.ceil(10 * P / 1e9)}
        extra = _mb(3 * 4 * E) if convert else 0
        return {"mem_mb": _round_mb(OVERHEAD_MB + 512 + extra), "threads": 1,
                "runtime": _minutes(size.weight_bytes, 3 + 2 * convert)}
    if stage == "init_model":
        return {"mem_mb": _round_mb(OVERHEAD_MB + _mb(P * b + 6 * 4 * E)), "threads": 2,
                "runtime": _minutes(size.weight_bytes, 2)}
    if stage == "train":
        state = 16 * P * 1.25  # fp32 weights + grads + AdamW moments, +25% activations
        return {"mem_mb": _round_mb(OVERHEAD_MB + 2048 + _mb(state)), "threads": 2, "runtime": 1440,
                "gpu_mem_mb": _round_mb(_mb(state) + 2048)}
    if stage == "evaluate":
        ctx = context or min(size.max_positions, 4096)
        act = 4 * batch_size * ctx * (8 * size.hidden_size + size.num_heads * ctx) + 2 * 4 * 256 * size.vocab_size
        host = (P * b if gpu else 4 * P + act)  # GPU: loaded on the host first, then moved
        threads = 4 if gpu else min(32, 4 + 4 * math.ceil(P / 1e9))
        runtime = (30 + math.ceil(15 * P / 1e9)) if gpu else (60 + math.ceil(240 * P / 1e9))
        return {"mem_mb": _round_mb(OVERHEAD_MB + _mb(host)), "threads": threads, "runtime": runtime,
                "gpu_mem_mb": _round_mb(_mb(2 * P + act) + 1024)}
    if stage in ("delta_make", "delta_apply"):
        return {"mem_mb": _round_mb(OVERHEAD_MB + _mb(4 * E * b)), "threads": 1,
                "runtime": _minutes(size.weight_bytes, 4)}
    raise ValueError(f"sizing: unknown stage {stage!r}; known: {', '.join(STAGES)}")


@functools.lru_cache(maxsize=64)
def _cached_size(path: str, mtime_ns: int, dtype: str) -> ModelSize:
    return model_size(path, dtype)


def estimate_resources(stage: str, path: PathLike | None, fallback: PathLike | None = None, *,
                       dtype: str = "auto", **kw: object) -> dict[str, int]:
    """``stage_resources`` for the model at ``path``; while it does not exist yet (Snakemake planning a job
    whose input another job makes), for ``fallback`` (the configured base: later models differ from it
    only by their new vocabulary rows), else for an empty model (the overhead only)."""
    for p in (path, fallback):
        if p and Path(p).exists():
            size = _cached_size(str(p), Path(p).stat().st_mtime_ns, dtype if stage == "base_model" else "auto")
            convert = stage == "base_model" and dtype != "auto" and not size.gguf
            return stage_resources(stage, size, convert=convert, **kw)  # type: ignore[arg-type]
    return stage_resources(stage, ModelSize(), **kw)  # type: ignore[arg-type]


#: Public bases of the three sizes in the README table (parameters, stored dtype, embedding, vocabulary).
REFERENCE = {
    "1B (LLaMA-3.2-1B, bf16)": ModelSize(1_235_814_400, 2, 128_256 * 2048, 128_256, 131_072, 2048, 32),
    "7B (LLaMA-2-7B, fp16)": ModelSize(6_738_415_616, 2, 32_000 * 4096, 32_000, 4096, 4096, 32),
    "13B (LLaMA-2-13B, fp16)": ModelSize(13_015_864_320, 2, 32_000 * 5120, 32_000, 4096, 5120, 40),
}


def _gb(mb: int) -> str:
    return f"{mb / 1024:.1f} GiB"


def table_md() -> str:
    """The README table: host memory / threads / time per stage, and GPU memory, for the reference bases."""
    names = list(REFERENCE)
    lines = ["| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [("base_model (HF dir, dtype kept)", "base_model", {}), ("init_model", "init_model", {}),
            ("train, one CPU process", "train", {}), ("evaluate on CPU (batch 8)", "evaluate", {}),
            ("evaluate on a GPU (host side)", "evaluate", {"gpu": True}),
            ("delta_make / delta_apply", "delta_make", {})]
    for label, stage, kw in rows:
        cells = []
        for n in names:
            r = stage_resources(stage, REFERENCE[n], **kw)
            time = "time set by its steps" if stage == "train" else f"{r['runtime']} min"
            cells.append(f"{_gb(r['mem_mb'])}, {r['threads']} CPU, {time}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, stage, kw in (("GPU memory: train (DDP, per GPU)", "train", {}),
                             ("GPU memory: evaluate", "evaluate", {"gpu": True})):
        cells = [_gb(stage_resources(stage, REFERENCE[n], **kw)["gpu_mem_mb"]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cptflow.model.sizing", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="a model directory or .gguf file (default: print the README table)")
    args = p.parse_args(argv)
    if args.model is None:
        print(table_md(), end="")
        return 0
    size = model_size(args.model)
    print(json.dumps({"size": size.__dict__, **{s: stage_resources(s, size) for s in STAGES}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
