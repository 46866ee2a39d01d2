"""cptflow.model.sizing: resources from a model's size, the README table, and budgets above measured peaks."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from cptflow.model.sizing import (REFERENCE, STAGES, ModelSize, estimate_resources, model_size, stage_resources,
                                  table_md)
from support.models import tiny_hf


def test_readme_table_is_the_functions_output():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert table_md() in readme, "README's sizing table is stale: paste `python -m cptflow.model.sizing`"


def test_resources_grow_with_the_model_and_its_dtype():
    small, big = REFERENCE["1B (LLaMA-3.2-1B, bf16)"], REFERENCE["13B (LLaMA-2-13B, fp16)"]
    for stage in STAGES:
        a, b = stage_resources(stage, small), stage_resources(stage, big)
        assert set(a) >= {"mem_mb", "threads", "runtime"}
        assert all(isinstance(v, int) and v > 0 for v in a.values())
        assert b["runtime"] >= a["runtime"], stage
    # init_model holds the model as stored: float32 needs 2 bytes more per parameter than bfloat16
    fp32 = ModelSize(**{**big.__dict__, "bytes_per_param": 4})
    grow = stage_resources("init_model", fp32)["mem_mb"] - stage_resources("init_model", big)["mem_mb"]
    assert abs(grow - 2 * big.n_params / 2**20) <= 100
    # training: 16 bytes per parameter (+25%), so a 13B base needs ~10x a 1.2B one
    t = stage_resources("train", big)["mem_mb"] / stage_resources("train", small)["mem_mb"]
    assert 8 < t < 11
    assert stage_resources("evaluate", big, gpu=True)["mem_mb"] < stage_resources("evaluate", big)["mem_mb"]
    with pytest.raises(ValueError, match="unknown stage"):
        stage_resources("vocab", small)


def test_model_size_reads_headers_and_config(tmp_path):
    d = tiny_hf(tmp_path / "m", tied=True, dtype="bfloat16", shard="400KB")
    s = model_size(d)
    assert (s.bytes_per_param, s.vocab_size, s.hidden_size, s.num_heads) == (2, 32768, 16, 2)
    assert s.largest_tensor == 32768 * 16
    from cptflow.model.loader import load_causal_lm

    assert s.n_params == sum(p.numel() for p in load_causal_lm(d).parameters())
    # planning: the input does not exist yet -> size the configured base; nothing at all -> overhead only
    assert estimate_resources("init_model", tmp_path / "later", d) == stage_resources("init_model", s)
    assert estimate_resources("init_model", None, tmp_path / "nothing") == stage_resources("init_model", ModelSize())


def test_budgets_cover_the_measured_peaks_of_the_real_model(smollm2):
    """SmolLM2-135M: the base_model stage's measured peak RSS (its own process) is inside what the function
    asks for; init_model's is checked in test_init_model.py, where it runs."""
    m = smollm2["manifest"]
    gguf = stage_resources("base_model", model_size(smollm2["gguf"]))
    assert m["peak_rss_mb"] <= gguf["mem_mb"], (m["peak_rss_mb"], gguf)
    size = model_size(smollm2["base"])
    assert size.n_params == m["n_params"] and size.bytes_per_param == 4


@pytest.mark.slow
def test_slurm_profile_gives_evaluate_a_gpu_and_sized_resources(tmp_path):
    """Real snakemake, dry run with profiles/slurm on the main Snakefile and a real HF base."""
    import os
    import subprocess
    import sys

    model = tiny_hf(tmp_path / "mymodel")
    cfg = tmp_path / "cfg.yaml"
    text = (REPO / "tests" / "configs" / "tiny.yaml").read_text()
    cfg.write_text(text.replace("base_model:\n", f"base_model:\n  path: {model}\n", 1))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(cfg), "--dry-run"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    jobs = {m.group(1): m.group(2) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)*?    resources: ([^\n]+)", log)}
    for rule in ("base_model", "evaluate"):
        assert rule in jobs, sorted(jobs)
    assert "gpu=1" in jobs["evaluate"].split(", ") and "slurm_partition=EDIT_ME_gpu_partition" in jobs["evaluate"]
    want = stage_resources("base_model", model_size(model))
    assert f"mem_mb={want['mem_mb']}" in jobs["base_model"] and f"runtime={want['runtime']}" in jobs["base_model"]
