"""GPU check of the training step: packed attention kernels, torch.compile, FSDP2, MFU, peak memory, loss memory.

Usage (one H100/H200; ``bench/gpu.sh`` is the same with PYTHONPATH set)::

    PYTHONPATH=src python bench/gpu.py                      # ~1 B LLaMA, writes the `gpu` section of RESULTS.md
    PYTHONPATH=src python bench/gpu.py --device cpu         # tiny config: exercises every path on CPU
    PYTHONPATH=src python bench/gpu.py --steps 5 --no-write

Sized to finish within 8 minutes on one H100/H200 (``--budget-s`` stops starting new variants when
the time is spent, and says which did not run). Needs only torch and transformers: no datasets,
DeepSpeed or flash-attn (packed batches are generated in memory; flash-attn is used when present).
Three parts:

1. **Cross-document check** (issue 11 item 1 on the real kernels): a 4-layer model (hidden 512, GQA
   8/2 heads) gets a micro-batch of 2 packed rows of 4096 tokens; every token's loss with each
   kernel's packed inputs is compared with the loss of its document run alone (plain causal SDPA),
   and the gradient of the packed loss with the sum of the documents' gradients. A run with a plain
   causal mask across documents (what a kernel that ignores the packing would do) is the control.
2. **Training step throughput** of a ≈1 B LLaMA (16 layers x 2048 hidden, 16/4 heads, MLP 5632,
   vocabulary 72 k, sequence 4096, micro-batch 4, bf16 autocast over fp32 master weights, AdamW,
   chunked loss), through cptflow's own engines and ``CausalLMLoss``: SDPA, FlexAttention and varlen
   document masking, each without and with per-layer ``torch.compile`` (the flex kernel itself is
   always compiled: transformers compiles ``flex_attention``), plus FSDP2 (one process). tokens/s
   counts real tokens (the generated batches have no padding); MFU = (6·N + 12·L·H·T)·tokens/s /
   peak with N including lm_head (cptflow.train.metrics); peak memory from torch.cuda.
3. **Loss memory**: peak memory of lm_head + cross-entropy + backward above its inputs at hidden
   2048 and vocabulary 72 k, plain (full logits) vs ``linear_cross_entropy``, for several token
   counts (CUDA: torch.cuda.max_memory_allocated, 4096 and 4 x 4096 tokens; CPU: max RSS of a fresh
   subprocess, 2048-8192 tokens).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_md import run_info, write_section  # noqa: E402

from cptflow.model.modeling import IGNORE_INDEX, matmul_params, model_dims  # noqa: E402
from cptflow.train import attention, engines, metrics, parallel  # noqa: E402
from cptflow.train.config import TrainStageConfig  # noqa: E402
from cptflow.train.loss import CausalLMLoss, linear_cross_entropy, shift_targets  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECS = {  # layers, hidden, mlp, heads, kv heads, vocab, seq, micro-batch
    "1b": dict(layers=16, hidden=2048, mlp=5632, heads=16, kv=4, vocab=72000, seq=4096, micro=4),
    "check": dict(layers=4, hidden=512, mlp=1376, heads=8, kv=2, vocab=32000, seq=4096, micro=2),
    "tiny": dict(layers=2, hidden=64, mlp=128, heads=4, kv=2, vocab=1000, seq=256, micro=2),
    "tiny_check": dict(layers=2, hidden=64, mlp=128, heads=4, kv=2, vocab=1000, seq=128, micro=2),
}


def llama(spec: dict, kernel: str, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    attention.register()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["mlp"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv"], max_position_embeddings=spec["seq"], use_cache=False)
    cfg._attn_implementation = attention.HF_IMPL[kernel]  # a fresh config per model (transformers mutates it)
    with torch.device(device):
        return LlamaForCausalLM(cfg)


def packed_batch(spec: dict, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """micro x seq tokens, documents of 32..seq/2 tokens packed back to back (a row never continues one)."""
    g = torch.Generator().manual_seed(seed)
    pos = []
    for _ in range(spec["micro"]):
        row: list[torch.Tensor] = []
        while sum(len(r) for r in row) < spec["seq"]:
            n = int(torch.randint(32, max(33, spec["seq"] // 2), (1,), generator=g))
            row.append(torch.arange(min(n, spec["seq"] - sum(len(r) for r in row))))
        pos.append(torch.cat(row))
    ids = torch.randint(0, spec["vocab"], (spec["micro"], spec["seq"]), generator=g)
    return {"input_ids": ids.to(device), "position_ids": torch.stack(pos).to(device), "labels": ids.clone().to(device)}


def cross_document_check(spec: dict, device: torch.device, kernels: list[str]) -> list[dict]:
    """Per kernel: max/mean |per-token loss packed - alone| and the relative gradient error (bf16 autocast)."""
    b = packed_batch(spec, seed=1, device=device)
    ref = llama(spec, "sdpa", device)
    targets = shift_targets(b["labels"])
    auto = torch.autocast(device.type, dtype=torch.bfloat16)
    alone = torch.zeros(targets.shape, device=device)
    with auto:
        for r in range(spec["micro"]):
            starts = (b["position_ids"][r] == 0).nonzero().flatten().tolist() + [spec["seq"]]
            for a, e in zip(starts[:-1], starts[1:]):
                logits = ref(input_ids=b["input_ids"][r:r + 1, a:e]).logits[0].float()
                alone[r, a:e] = F.cross_entropy(logits, targets[r, a:e], reduction="none")
        alone.sum().backward()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    out = []
    for kernel in kernels + ["control"]:
        try:
            out.append(check_kernel(spec, device, kernel, b, targets, alone, g_ref))
        except Exception as e:  # a kernel this machine's torch lacks or breaks: say so, check the others
            out.append({"kernel": kernel, "error": f"{type(e).__name__}: {e}"[:200]})
        free(device)
    return out


def check_kernel(spec: dict, device: torch.device, kernel: str, b: dict, targets: torch.Tensor,
                 alone: torch.Tensor, g_ref: torch.Tensor) -> dict:
    """One kernel of the cross-document check (see ``cross_document_check``)."""
    auto = torch.autocast(device.type, dtype=torch.bfloat16)
    model = llama(spec, "sdpa" if kernel == "control" else kernel, device)
    if kernel == "control":  # causal across the whole row, positions still restarting: packing ignored
        causal = torch.ones(spec["seq"], spec["seq"], dtype=torch.bool, device=device).tril()
        inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"],
                  "attention_mask": causal.expand(spec["micro"], 1, -1, -1)}
    else:
        inputs = attention.model_inputs(kernel, b["input_ids"], b["position_ids"])
    backward = not (kernel == "flex" and device.type == "cpu")  # no FlexAttention backward on CPU
    with auto, torch.set_grad_enabled(backward):
        hidden = model.get_decoder()(**inputs).last_hidden_state.reshape(spec["micro"], spec["seq"], -1)
        logits = model.lm_head(hidden).float()
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        if backward:
            per_token.sum().backward()
    d = (per_token.detach() - alone.detach()).abs()
    row = {"kernel": kernel, "max_abs": float(d.max()), "mean_abs": float(d.mean())}
    if backward:
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        row["grad_rel"] = float((g - g_ref).norm() / g_ref.norm())
    return row


def train_variant(spec: dict, device: torch.device, kernel: str, compile_: bool, engine: str, steps: int,
                  warmup: int) -> dict:
    """Steps of cptflow's own engine on generated packed batches; tokens/s, MFU, peak memory."""
    cfg = TrainStageConfig(precision="bf16", attn=kernel, compile=compile_, engine=engine, lr=1e-4, warmup_steps=0,
                           loss_chunk_tokens=1024, micro_batch_size=spec["micro"])
    info = parallel.init_distributed(engine) if engine == "fsdp" else parallel.DistInfo(0, 0, 1, device, None)
    lm = llama(spec, kernel, device)
    n_matmul, (layers, hidden) = matmul_params(lm), model_dims(lm)
    eng = engines.build(engine, CausalLMLoss(lm, kernel, cfg.loss_chunk_tokens), cfg, info, None)
    flops_token = metrics.flops_per_token(n_matmul, layers, hidden, spec["seq"])
    batches = [packed_batch(spec, seed=s, device=device) for s in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, t_first = [], time.perf_counter()
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        with eng.autocast():
            nll = eng.model(**batches[i % 2])
        eng.backward(nll / spec["micro"] / spec["seq"])
        eng.step(1e-4, apply=True)
        sync(device)
        if i == warmup - 1:
            t_first = time.perf_counter() - t_first
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    tok_s = spec["micro"] * spec["seq"] / step_s
    peak = metrics.peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, "bf16")
    row = {"engine": engine, "kernel": kernel, "compile": compile_, "step_s": step_s, "tokens_per_s": tok_s,
           "mfu": metrics.mfu(tok_s, flops_token, peak, 1), "peak_mem_gib": metrics.peak_memory_gib(device),
           "warmup_s": t_first, "loss": nll.item() / spec["micro"] / spec["seq"], "matmul_params": n_matmul,
           "flops_per_token": flops_token}
    del eng, lm, nll
    free(device)
    if engine == "fsdp":
        parallel.shutdown()
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def loss_peak(kind: str, tokens: int, hidden: int, vocab: int, device: torch.device) -> float:
    """Peak extra bytes of loss + backward over what the inputs and weight already hold."""
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = torch.randn(vocab, hidden, device=device, generator=g).mul_(0.02).requires_grad_()  # in place: no temp
    t = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    t[::50] = IGNORE_INDEX
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_now()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if kind == "plain":  # what transformers does: all logits, then cross-entropy in fp32
            loss = F.cross_entropy((h @ w.t()).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            loss = linear_cross_entropy(h, w, t, 1024)
    loss.backward()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss()
    return (peak - base) / 2**30


def rss() -> int:
    """Peak resident memory of this process so far (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    """Resident memory now (bytes); the inputs are made without temporaries, so the peak so far is about this."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_memory(device: torch.device, token_counts: list[int]) -> list[dict]:
    """Peak extra GiB of plain vs chunked loss per token count (CPU: a fresh process per measurement)."""
    out = []
    for tokens in token_counts:
        row: dict = {"tokens": tokens}
        for kind in ("plain", "chunked"):
            if device.type == "cuda":
                row[kind] = loss_peak(kind, tokens, 2048, 72000, device)
                free(device)
                continue
            cmd = [sys.executable, __file__, "--device", "cpu", "--loss-child", kind, "--loss-tokens", str(tokens)]
            res = subprocess.run(cmd, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            if res.returncode:
                raise RuntimeError(res.stderr[-2000:])
            row[kind] = float(res.stdout.strip().splitlines()[-1])
        out.append(row)
    return out


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" with uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("CPTFLOW_COMMIT", "unknown (set CPTFLOW_COMMIT)")


def report(args, dev_name: str, check: list[dict], runs: list[dict], skipped: list[str], mem: list[dict],
           wall: float) -> str:
    import transformers

    lines = [f"## GPU check: packed attention, compile, FSDP2, MFU (`bench/gpu.py`, device {args.device})", "",
             run_info("gpu.py", args.load_start), "",
             f"Device: {dev_name}; torch {torch.__version__}, transformers {transformers.__version__}, "
             f"flash-attn {'installed' if attention.have_flash_attn() else 'not installed'}, "
             f"torch varlen_attn {'present' if attention.have_torch_varlen() else 'absent'}; "
             f"commit {commit()}; whole run {wall:.0f} s.", ""]
    if args.device == "cpu":
        lines += ["*CPU smoke run with the tiny config: it shows every path runs; its speed numbers mean nothing "
                  "for a GPU, and FlexAttention is checked forward only (no CPU backward in torch).*", ""]
    cs = SPECS["tiny_check" if args.device == "cpu" else "check"]
    lines += [f"### Cross-document check ({cs['layers']} layers x {cs['hidden']}, {cs['heads']}/{cs['kv']} heads, "
              f"micro-batch {cs['micro']} x {cs['seq']}, bf16 autocast)", "",
              "Verdict *within documents*: max |Δ| below a tenth of the control's (bf16 rounding stays far "
              "below it; a leak across documents reaches it).", "",
              "| kernel | max \\|Δ loss\\| per token | mean \\|Δ\\| | relative gradient error | verdict |",
              "|---|---|---|---|---|"]
    control = next((r for r in check if r["kernel"] == "control" and "error" not in r), {"max_abs": float("inf")})
    for r in check:
        if "error" in r:
            lines.append(f"| {r['kernel']} | failed: {r['error']} | | | |")
            continue
        ok = r["kernel"] == "control" or r["max_abs"] < 0.1 * control["max_abs"]
        verdict = "packing ignored (control)" if r["kernel"] == "control" else ("within documents" if ok else "LEAKS")
        lines.append(f"| {r['kernel']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
                     f"{r['grad_rel']:.3g} | {verdict} |" if "grad_rel" in r else
                     f"| {r['kernel']} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | (forward only) | {verdict} |")
    s = SPECS[args.config]
    n = next((r["matmul_params"] for r in runs if "matmul_params" in r), 0)  # the same model in every run
    peak = metrics.peak_flops(dev_name, "bf16")
    lines += ["", f"### Training step, {args.config}: {s['layers']} layers x {s['hidden']}, vocabulary {s['vocab']}, "
              f"sequence {s['seq']}, micro-batch {s['micro']}; N (matmul params incl. lm_head) = {n:,}", "",
              f"Median of {args.steps} steps after {args.warmup} warm-up steps; MFU against "
              + (f"{peak / 1e12:.0f} TFLOP/s (bf16 dense peak of the device)." if peak else "no known peak (CPU)."),
              "",
              "| engine | attention | compile | tokens/s | MFU | step s | peak GiB | warm-up s |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['kernel']} | {r['compile']} | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        pm = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {r['engine']} | {r['kernel']} | {r['compile']} | {r['tokens_per_s']:.0f} | {mfu} | "
                     f"{r['step_s']:.3f} | {pm} | {r['warmup_s']:.1f} |")
    if skipped:
        lines += ["", f"Not run (time budget {args.budget_s} s spent): {', '.join(skipped)}."]
    how = "torch.cuda.max_memory_allocated" if args.device != "cpu" else "max RSS of a fresh process"
    lines += ["", "### Loss memory: lm_head + cross-entropy + backward, hidden 2048, vocabulary 72000, bf16 autocast", "",
              f"Peak memory above the inputs ({how}); chunked = `linear_cross_entropy`, 1024 tokens per chunk.", "",
              "| tokens | plain (full logits) GiB | chunked GiB |", "|---|---|---|"]
    lines += [f"| {r['tokens']} | {r['plain']:.2f} | {r['chunked']:.2f} |" for r in mem]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default=None, help="1b (default on cuda) or tiny (default on cpu)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per variant (cuda 10, cpu 2)")
    p.add_argument("--warmup", type=int, default=3, choices=range(1, 100), metavar="N",
                   help="steps before measuring, >= 1 (compile happens here)")
    p.add_argument("--budget-s", type=int, default=420, help="start no new variant after this many seconds")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    p.add_argument("--loss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--loss-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    if args.loss_child:  # a fresh process measuring one loss variant's peak RSS (CPU)
        print(loss_peak(args.loss_child, args.loss_tokens, 2048, 72000, device))
        return 0
    args.load_start = os.getloadavg()
    cpu = device.type == "cpu"
    args.config = args.config or ("tiny" if cpu else "1b")
    args.steps = args.steps or (2 if cpu else 10)
    dev_name = torch.cuda.get_device_name(device) if not cpu else "cpu"
    t0 = time.perf_counter()
    kernels = ["sdpa", "flex", "varlen"]
    if not cpu and not (attention.have_flash_attn() or attention.have_torch_varlen()):
        kernels.remove("varlen")
    check = cross_document_check(SPECS["tiny_check" if cpu else "check"], device, kernels)
    print(json.dumps(check), flush=True)
    free(device)
    train_kernels = [k for k in kernels if not (cpu and k == "flex")]
    variants = [("ddp", k, c) for k in train_kernels for c in (False, True)]
    variants.append(("fsdp", "flex" if not cpu else "sdpa", True))
    runs, skipped = [], []
    for engine, kernel, comp in variants:
        if time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{engine}/{kernel}/compile={comp}")
            continue
        try:
            runs.append(train_variant(SPECS[args.config], device, kernel, comp, engine, args.steps, args.warmup))
        except Exception as e:  # an OOM or a kernel missing on this machine: report it, measure the rest
            runs.append({"engine": engine, "kernel": kernel, "compile": comp, "error": f"{type(e).__name__}: {e}"[:200]})
            free(device)
        print(json.dumps(runs[-1]), flush=True)
    mem = loss_memory(device, [2048, 4096, 8192] if cpu else [4096, 4 * 4096])
    md = report(args, dev_name, check, runs, skipped, mem, time.perf_counter() - t0)
    if args.no_write:
        print(md)
    else:
        write_section("gpu" if not cpu else "gpu_cpu_smoke", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
