"""Helpers shared by the training tests (tests/train/): tiny packed data and models, paths, killing torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from cptflow.train import train

V, T = 256, 32  # vocabulary and sample length of the tiny training runs
# 12 AdamW steps of global batch 2 (micro 1): the runs test_train and test_fsdp compare
BASE = {"precision": "fp32", "micro_batch_size": 1, "global_batch_size": 2, "max_steps": 12, "warmup_steps": 2,
        "lr": 1e-2, "min_lr": 1e-3, "checkpoint_every": 4, "keep_last": 2, "log_every": 4}


REPO = Path(__file__).resolve().parents[2]


def make_data(path: Path, per_bucket: int = 12) -> Path:
    """Learnable sequences (+1 / +3 progressions), two packed documents per sample, two buckets (packed format)."""
    from cptflow.pack.packed import write_dataset

    rng = np.random.default_rng(0)
    ids, real, cats, buckets = [], [], [], []
    for b in range(2):
        for i in range(per_bucket):
            cat = ("zh_web", "en_replay")[i % 2]
            ids.append((rng.integers(0, V) + (1 if cat == "zh_web" else 3) * np.arange(T)) % V)
            real.append(T - 4 if i % 3 == 0 else T)  # a padding tail
            cats.append(cat)
            buckets.append(b)
    rows = len(ids)
    starts = (np.arange(rows)[:, None] * T + np.array([0, 20])).reshape(-1)  # documents at 0 and 20 in every row
    write_dataset(path, np.stack(ids), starts, np.array(real), cats, np.array(buckets))
    return path


def make_model(path: Path, tied: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    for f in ("tokenizer_config.json", "special_tokens_map.json"):  # carried to the output unchanged
        shutil.copy(REPO / "workflow/resources/demo/tokenizer" / f, path / f)
    return path


def paths(root: Path, model: Path, data: Path, name: str) -> train.TrainPaths:
    out = root / name
    return train.TrainPaths(model, data, out / "model", out / "ckpt", out / "metrics.jsonl", out / "stats.json",
                            out / "tb")


def torchrun(nproc: int, p: train.TrainPaths, params: dict, *extra: str) -> subprocess.Popen:
    """``nproc`` CPU workers of cptflow.train.train (one thread each) under torchrun; output to a file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cptflow.train.train", "--model", str(p.model), "--data", str(p.data), "--output-dir", str(p.output_dir),
           "--checkpoint-dir", str(p.checkpoint_dir), "--metrics", str(p.metrics), "--stats", str(p.stats),
           "--tensorboard-dir", str(p.tensorboard_dir), "--params", json.dumps(params), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    p.output_dir.parent.mkdir(parents=True, exist_ok=True)
    out = open(p.output_dir.parent / "torchrun.log", "w")  # a file, not a pipe: a full pipe would block the workers
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def samples(d: Path) -> dict[int, dict[int, list[int]]]:
    """step -> rank -> sample ids, from --debug-samples files."""
    out: dict[int, dict[int, list[int]]] = {}
    for f in sorted(d.glob("rank*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["step"], {})[r["rank"]] = r["ids"]
    return out


def run_inproc(tiny: dict, name: str, params: dict | None = None, model: Path | None = None,
               hooks: train.DebugHooks = train.DebugHooks()) -> train.TrainPaths:
    """One in-process training run of ``BASE`` overridden by ``params`` on ``tiny``'s data; its paths."""
    from cptflow.core.config import from_dict
    from cptflow.train.config import TrainStageConfig

    p = paths(tiny["root"], model or tiny["model"], tiny["data"], name)
    train.run(from_dict(TrainStageConfig, {**BASE, **(params or {})}), p, hooks)
    return p


def kill_after_checkpoint(proc: subprocess.Popen, p: train.TrainPaths, step: int) -> None:
    """Wait until checkpoint ``step`` of the run is complete, then SIGKILL the whole job (``kill_job``)."""
    deadline = time.time() + 300
    while not list(p.checkpoint_dir.glob(f"run-*/step_{step:08d}/COMPLETE")):
        assert proc.poll() is None and time.time() < deadline, (p.output_dir.parent / "torchrun.log").read_text()
        time.sleep(0.05)
    kill_job(proc)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun *and* its workers, as when a job is killed (a cgroup dies whole).

    torchrun starts each worker in a session of its own, so killing the agent alone leaves the
    workers training on: freeze the agent, kill its children, then the agent.
    """
    os.kill(proc.pid, signal.SIGSTOP)
    workers = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _ppid(d) == proc.pid]
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while any(_alive(pid) for pid in workers):
        assert time.time() < deadline, "workers survived SIGKILL"
        time.sleep(0.05)


def _ppid(d: Path) -> int | None:
    try:
        return int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has stopped running; init reaps it


def weights(p: train.TrainPaths) -> dict[str, torch.Tensor]:
    return load_file(str(p.output_dir / "model.safetensors"))
