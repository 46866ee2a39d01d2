"""Benchmark: peak memory and time of ``cptflow.release.delta make/apply`` against loading both models whole.

Usage::

    .venv/bin/python bench/delta.py                   # writes the `delta` section of bench/RESULTS.md
    .venv/bin/python bench/delta.py --hidden 512 --layers 4 --no-write

Models (built once into bench/_work/delta/, not timed): a random-init LLaMA base (``--hidden``,
``--layers``, vocabulary 32768, bf16, saved sharded by ``save_pretrained``) and an "adapted" model
made from it the way continual pre-training changes a model: every base weight moved a little
(bf16 noise), the embedding and output matrices grown to ``--vocab`` rows (the expanded
tokenizer's size) with the new rows fresh. Each measurement runs in a fresh subprocess; peak memory
is that process's ``ru_maxrss`` (from ``os.wait4``), time is its wall time including Python start.

* ``cptflow.release.delta make`` / ``apply`` (the CLI, as the workflow calls it); apply checks the sha256
  of every output file itself, and the benchmark checks again that the rebuilt directory's weight
  files equal the adapted ones byte for byte.
* The whole-model baseline does the same job the obvious way: ``from_pretrained`` both models
  (bf16), XOR the bit patterns tensor by tensor (the same exact scheme, so only the memory strategy
  differs) and ``safetensors.torch.save_file`` the delta; its apply loads the base model and the
  delta whole, XORs back and ``save_pretrained``\\s the result. The baseline also counts how many
  bf16 elements a plain float difference would get wrong (``base + (adapted - base) != adapted``),
  which is why cptflow stores XOR bits, not differences.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from results_md import run_info, write_section  # noqa: E402 (bench/ is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "_work" / "delta"
SECTION = "delta"
DEMO_TOKENIZER = ROOT / "workflow" / "resources" / "demo" / "tokenizer"
BASE_VOCAB = 32768  # the demo (Mistral v0.3) tokenizer's size


def llama_config(hidden: int, layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 128), num_key_value_heads=max(1, hidden // 128),
                       intermediate_size=int(hidden * 2.75) // 64 * 64, max_position_embeddings=2048,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def worker_build(args: argparse.Namespace) -> dict:
    """Base and adapted model directories; deterministic for a given seed."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    base_dir, adapted_dir = WORK / "base", WORK / "adapted"
    model = LlamaForCausalLM(llama_config(args.hidden, args.layers, BASE_VOCAB)).to(torch.bfloat16)
    model.save_pretrained(str(base_dir), max_shard_size=args.shard_size)
    n_base = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():  # "training": every weight moves a little
            p.add_(torch.randn_like(p) * 1e-3)
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
        for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            emb[BASE_VOCAB:].normal_(0.0, 0.02)
    model.save_pretrained(str(adapted_dir), max_shard_size=args.shard_size)
    for d in (base_dir, adapted_dir):
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(DEMO_TOKENIZER / f, d / f)
    return {"base_params": n_base, "adapted_params": sum(p.numel() for p in model.parameters())}


def _bits(t):
    import torch

    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def worker_naive_make(args: argparse.Namespace) -> dict:
    """Both models whole in memory, XOR per tensor (new rows stored whole), one safetensors file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(WORK / "base"), dtype=torch.bfloat16).state_dict()
    adapted = AutoModelForCausalLM.from_pretrained(str(WORK / "adapted"), dtype=torch.bfloat16).state_dict()
    delta = {}
    for name, a in adapted.items():
        b = base.get(name)
        d = _bits(a).clone()
        if b is not None:
            d[: b.shape[0]] ^= _bits(b)
        delta[name] = d.contiguous()
    out = WORK / "naive_delta"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    save_file(delta, str(out / "delta.safetensors"))
    return {}


def worker_float_check(args: argparse.Namespace) -> dict:
    """How many bf16 elements a plain float delta gets wrong: ``base + (adapted - base) != adapted``."""
    from safetensors import safe_open

    from cptflow.model.safetensors_io import tensor_index

    base_idx, adapted_idx = tensor_index(WORK / "base"), tensor_index(WORK / "adapted")
    wrong = total = 0
    for name, (apath, _) in sorted(adapted_idx.items()):
        if name not in base_idx:
            continue
        with safe_open(str(apath), "pt") as fa, safe_open(str(base_idx[name][0]), "pt") as fb:
            a, b = fa.get_tensor(name), fb.get_tensor(name)
        a = a[: b.shape[0]]
        back = b + (a - b)
        wrong += int((_bits(back) != _bits(a)).sum())
        total += b.numel()
    return {"float_delta_wrong": wrong, "float_delta_total": total}


def worker_imports(args: argparse.Namespace) -> dict:
    """Reference: what the interpreter holds after importing torch, transformers and safetensors."""
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    return {}


def worker_naive_apply(args: argparse.Namespace) -> dict:
    """Base model and delta whole in memory, XOR back, save_pretrained the adapted model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(WORK / "base"), dtype=torch.bfloat16).state_dict()
    delta = load_file(str(WORK / "naive_delta" / "delta.safetensors"))
    cfg = AutoConfig.from_pretrained(str(WORK / "adapted"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    state = {}
    for name, d in delta.items():
        b = base.get(name)
        if b is not None:
            d[: b.shape[0]] ^= _bits(b)
        state[name] = d.view(torch.bfloat16)
    model.load_state_dict(state, assign=True)
    out = WORK / "naive_out"
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out), max_shard_size=args.shard_size)
    return {}


# ----------------------------------------------------------------------------- measuring
def measured(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one fresh subprocess (its own ru_maxrss, via wait4)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = open(WORK / "last_run.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{(WORK / 'last_run.log').read_text()[-3000:]}")
    lines = out.strip().splitlines()
    extra = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            **extra}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def dir_mb(d: Path, pattern: str = "*.safetensors") -> float:
    return sum(f.stat().st_size for f in d.glob(pattern)) / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the random LLaMA")
    p.add_argument("--layers", type=int, default=8, help="transformer blocks")
    p.add_argument("--vocab", type=int, default=71862, help="adapted vocabulary (base has 32768); default = "
                   "the demo tokenizer expanded with vocab_size 44000")
    p.add_argument("--shard-size", default="100MB", help="save_pretrained max_shard_size of both models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per step: median time, max peak RSS reported")
    p.add_argument("--rebuild", action="store_true", help="rebuild the models even if present")
    p.add_argument("--no-write", action="store_true", help="print the table only, leave RESULTS.md alone")
    p.add_argument("--worker", choices=("build", "naive_make", "naive_apply", "float_check", "imports"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.load_start = os.getloadavg()

    if args.worker:
        fn = {"build": worker_build, "naive_make": worker_naive_make, "naive_apply": worker_naive_apply,
              "float_check": worker_float_check, "imports": worker_imports}[args.worker]
        print(json.dumps(fn(args)))
        return 0

    sys.path.insert(0, str(ROOT / "src"))
    WORK.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__, "--hidden", str(args.hidden), "--layers", str(args.layers),
          "--vocab", str(args.vocab), "--shard-size", args.shard_size, "--seed", str(args.seed)]
    spec = WORK / "models.json"
    want = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "shard_size": args.shard_size,
            "seed": args.seed}
    if args.rebuild or not spec.exists() or json.loads(spec.read_text()).get("spec") != want:
        for d in ("base", "adapted"):
            shutil.rmtree(WORK / d, ignore_errors=True)
        print("building base and adapted models ...", file=sys.stderr)
        built = measured(me + ["--worker", "build"])
        spec.write_text(json.dumps({"spec": want, **built}))
    info = json.loads(spec.read_text())
    steps = {
        "cptflow make": [sys.executable, "-m", "cptflow.release.delta_make", "--base", str(WORK / "base"), "--adapted", str(WORK / "adapted"),
                               "--output-dir", str(WORK / "delta")],
        "cptflow apply": [sys.executable, "-m", "cptflow.release.delta_apply", "--base", str(WORK / "base"), "--delta", str(WORK / "delta"),
                                "--output-dir", str(WORK / "rebuilt")],
        "whole-model make": me + ["--worker", "naive_make"],
        "whole-model apply": me + ["--worker", "naive_apply"],
        "imports only": me + ["--worker", "imports"],
    }
    outputs = {"cptflow make": "delta", "cptflow apply": "rebuilt", "whole-model make": "naive_delta",
               "whole-model apply": "naive_out"}
    tries: dict[str, list[dict]] = {k: [] for k in steps}
    for i in range(args.repeats):  # alternate the steps; each apply uses the delta its make just wrote
        for k, cmd in steps.items():
            if k in outputs and k.endswith("make"):
                for d in (outputs[k], outputs[k.replace("make", "apply")]):
                    shutil.rmtree(WORK / d, ignore_errors=True)
                    Path(f"{WORK / d}.stats.json").unlink(missing_ok=True)
            tries[k].append(measured(cmd))
            print(f"run {i + 1}/{args.repeats} {k}: {tries[k][-1]['seconds']:.1f} s, "
                  f"peak RSS {tries[k][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    runs = {k: {"seconds": statistics.median(r["seconds"] for r in v),
                "seconds_range": (min(r["seconds"] for r in v), max(r["seconds"] for r in v)),
                "cpu_s": statistics.median(r["cpu_s"] for r in v),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in v)} for k, v in tries.items()}
    check = measured(me + ["--worker", "float_check"])

    adapted_files = sorted(f.name for f in (WORK / "adapted").iterdir() if f.is_file())
    same = [f for f in adapted_files if (WORK / "rebuilt" / f).is_file()
            and sha256(WORK / "adapted" / f) == sha256(WORK / "rebuilt" / f)]
    naive_weights = sorted(f.name for f in (WORK / "naive_out").glob("*.safetensors"))
    naive_same = [f for f in naive_weights if (WORK / "adapted" / f).is_file()
                  and sha256(WORK / "adapted" / f) == sha256(WORK / "naive_out" / f)]
    wrong, total = check["float_delta_wrong"], check["float_delta_total"]

    import safetensors
    import torch
    import transformers

    from cptflow.model import safetensors_io
    from cptflow.release import delta_make

    largest = 0
    for f in (WORK / "adapted").glob("*.safetensors"):
        hdr = safetensors_io.read_header(f)
        largest = max(largest, *(t.end - t.begin for t in hdr.tensors))
    base_mb, adapted_mb = dir_mb(WORK / "base"), dir_mb(WORK / "adapted")
    lines = [
        "## delta: `cptflow.release.delta` make/apply vs loading both models whole", "",
        run_info("delta.py", args.load_start),
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}, cptflow.release.delta_make VERSION {delta_make.VERSION}.", "",
        f"Models: random-init LLaMA, hidden {args.hidden}, {args.layers} layers, untied embeddings, bf16, "
        f"`save_pretrained(max_shard_size=\"{args.shard_size}\")`. Base: vocab {BASE_VOCAB}, "
        f"{info['base_params'] / 1e6:.0f} M parameters, {base_mb:.0f} MB in "
        f"{len(list((WORK / 'base').glob('*.safetensors')))} shard(s). Adapted: every weight + N(0, 1e-3) noise, "
        f"vocab {args.vocab} (new rows fresh), {info['adapted_params'] / 1e6:.0f} M parameters, {adapted_mb:.0f} MB "
        f"in {len(list((WORK / 'adapted').glob('*.safetensors')))} shard(s); largest tensor {largest / 1e6:.0f} MB. "
        "Each row is one fresh process: wall time including Python start and imports, peak RSS = its ru_maxrss.", "",
        f"| step | wall s (median of {args.repeats}) | wall s (min–max) | CPU s (median) | peak RSS (MiB, max) "
        "| output (MB) |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {label} | {runs[k]['seconds']:.1f} | {runs[k]['seconds_range'][0]:.1f}–{runs[k]['seconds_range'][1]:.1f} "
          f"| {runs[k]['cpu_s']:.1f} "
          f"| {runs[k]['peak_rss_mb']:.0f} | {f'{dir_mb(WORK / outputs[k]):.0f}' if k in outputs else '—'} |"
          for k, label in (("cptflow make", "`python -m cptflow.release.delta_make`"),
                           ("cptflow apply", "`python -m cptflow.release.delta_apply` (verifies sha256)"),
                           ("whole-model make", "whole models: `from_pretrained` both, XOR, `save_file`"),
                           ("whole-model apply", "whole models: `from_pretrained` base + `load_file` delta, XOR, "
                                                 "`save_pretrained`"),
                           ("imports only", "reference: Python + `import torch, transformers, safetensors`"))),
        "",
        f"**Peak memory: make {runs['whole-model make']['peak_rss_mb'] / runs['cptflow make']['peak_rss_mb']:.1f}x and "
        f"apply {runs['whole-model apply']['peak_rss_mb'] / runs['cptflow apply']['peak_rss_mb']:.1f}x lower with "
        f"cptflow.release.delta; wall time: make {runs['whole-model make']['seconds'] / runs['cptflow make']['seconds']:.2f}x, "
        f"apply {runs['whole-model apply']['seconds'] / runs['cptflow apply']['seconds']:.2f}x; CPU time: make "
        f"{runs['whole-model make']['cpu_s'] / runs['cptflow make']['cpu_s']:.2f}x, apply "
        f"{runs['whole-model apply']['cpu_s'] / runs['cptflow apply']['cpu_s']:.2f}x "
        "(whole-model / cptflow: above 1 means cptflow is faster).**", "",
        f"- Bit exactness: `cptflow.release.delta apply` rebuilt {len(same)}/{len(adapted_files)} files of the adapted "
        f"directory with identical sha256 (checked by apply itself and again here). The whole-model apply's "
        f"`save_pretrained` output matches {len(naive_same)}/{len(naive_weights)} weight files byte for byte "
        "(same transformers version and shard size as the adapted model was saved with; nothing guarantees that "
        "across versions, which is why cptflow keeps the adapted headers verbatim).",
        f"- A plain bf16 float delta (`adapted - base`, added back) would get {wrong:,} of {total:,} base-shaped "
        f"elements wrong ({100 * wrong / max(1, total):.4f}%): rare, but not zero.",
        f"- Above the interpreter's {runs['imports only']['peak_rss_mb']:.0f} MiB, cptflow make holds "
        f"{runs['cptflow make']['peak_rss_mb'] - runs['imports only']['peak_rss_mb']:.0f} MiB = "
        f"{(runs['cptflow make']['peak_rss_mb'] - runs['imports only']['peak_rss_mb']) * 2**20 / largest:.1f}x "
        "the largest tensor; the whole-model make holds "
        f"{runs['whole-model make']['peak_rss_mb'] - runs['imports only']['peak_rss_mb']:.0f} MiB, about base + "
        "adapted + delta.",
        "- cptflow's time includes sha256 of every input and output file (manifest and verification); the "
        "whole-model rows hash nothing. cptflow reads one tensor at a time, so its peak is bounded by a few "
        "copies of the largest tensor plus the interpreter, whatever the model size; the whole-model peak grows "
        "with the sum of both models."]
    md = "\n".join(lines) + "\n"
    print(md)
    if not args.no_write:
        write_section(SECTION, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
