"""Shared test fixtures: paths to the repo's own data (tests never need ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.deepspeed import overlay  # noqa: F401 - the DeepSpeed overlay venv fixture (tests/train, tests/sft)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "workflow" / "resources" / "demo"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


def read_texts(path: Path, n: int | None = None) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if n is not None and len(out) >= n:
                break
    return out


def schema_section(name: str) -> dict:
    """The JSON-Schema of one config section, from the one config/schema.yaml."""
    import yaml

    return yaml.safe_load((REPO / "config" / "schema.yaml").read_text(encoding="utf-8"))["properties"][name]


# ---- the local SLURM test cluster (tests/slurm/cluster.sh), shared by tests/test_slurm*.py ----------------
SLURM_CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


def slurm_env() -> dict[str, str]:
    """The venv's bin/ first on PATH: the rules' `python` and the jobs (sbatch --export=ALL) use it."""
    import os
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def slurm_must_run() -> bool:
    """CI (or CPTFLOW_REQUIRE_SLURM=1): a cluster that cannot start is a failure, not a skip."""
    import os

    return bool(os.environ.get("CI")) or os.environ.get("CPTFLOW_REQUIRE_SLURM") == "1"


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the test cluster once per session (install on first use); stop it at the end unless it was
    already running. Skipped only where it cannot run (cluster.sh exit status 3), except under CI."""
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("bash is missing")
    try:
        proc = subprocess.run([str(SLURM_CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"tests/slurm/cluster.sh start timed out:\n{e.stdout}\n{e.stderr}")
    out = proc.stdout + proc.stderr
    if proc.returncode == 3:
        reason = f"SLURM test cluster cannot run on this machine: {proc.stderr.strip()}"
        if slurm_must_run():
            pytest.fail(reason + " (CI / CPTFLOW_REQUIRE_SLURM=1: this test must run)")
        pytest.skip(reason)
    assert proc.returncode == 0, f"tests/slurm/cluster.sh start failed:\n{out}"
    print(out)  # timings, shown with pytest -s
    started_here = "already running" not in out
    yield
    if started_here:
        stop = subprocess.run([str(SLURM_CLUSTER), "stop"], capture_output=True, text=True, timeout=120)
        print(stop.stdout + stop.stderr)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def tiny_llama(*, layers: int, heads: int, kv_heads: int, max_positions: int, lm_head_scale: float):
    """A random tiny LLaMA over the demo tokenizer's 32768 ids, seeded.

    ``lm_head_scale`` enlarges the output weights so logits are far from uniform and ties between
    candidates cannot hide scoring errors.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32768, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(lm_head_scale)
    return m
