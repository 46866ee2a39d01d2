"""The `cptflow` command from the installed venv: help, version, delta, eval, run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO, tiny_llama
from cptflow import __version__
from cptflow.eval.benchmarks import parse_benchmark_arg

CPTFLOW = Path(sys.executable).parent / "cptflow"


def cptflow(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(CPTFLOW), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_help_version_and_unknown_command():
    proc = cptflow("--help")
    assert proc.returncode == 0
    for cmd in ("delta apply", "delta make", "eval", "run", "--version"):
        assert f"cptflow {cmd}" in proc.stdout
    assert cptflow("--version").stdout.strip() == f"cptflow {__version__}"
    bad = cptflow("frobnicate")
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr


@pytest.mark.parametrize("sub,flags", [("apply", ("--base", "--delta", "--output-dir")),
                                       ("make", ("--base", "--adapted", "--output-dir"))])
def test_delta_help(sub, flags):
    proc = cptflow("delta", sub, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: cptflow delta {sub}")
    assert all(f in proc.stdout for f in flags)
    assert cptflow("delta").returncode == 2


def test_delta_apply_errors_name_the_missing_directory(tmp_path):
    proc = cptflow("delta", "apply", "--base", str(tmp_path / "nope"), "--delta", str(tmp_path / "d"),
                   "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and str(tmp_path / "d") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_benchmark_argument():
    spec = parse_benchmark_arg(f"cmmlu={DEMO / 'benchmarks/cmmlu'}:cmmlu", shots=2)
    assert spec == {"name": "cmmlu", "path": str(DEMO / "benchmarks/cmmlu"), "layout": "cmmlu", "lang": "zh",
                    "eval_split": "test", "shots": 2}
    for bad, msg in (("cmmlu", "NAME=PATH:LAYOUT"), (f"x={DEMO}:nope", "layout 'nope'"), ("x=/no/such:mmlu", "not a dir")):
        with pytest.raises(ValueError, match=msg):
            parse_benchmark_arg(bad)


def test_eval_scores_a_local_model_on_published_layouts(tmp_path):
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    tiny_llama(layers=1, heads=2, kv_heads=1, max_positions=2048, lm_head_scale=4.0).save_pretrained(model)
    AutoTokenizer.from_pretrained(DEMO / "tokenizer").save_pretrained(model)
    out = tmp_path / "res.json"
    proc = cptflow("eval", "--model", str(model), "--benchmark", f"cmmlu={DEMO / 'benchmarks/cmmlu'}:cmmlu",
                   "--benchmark", f"mmlu={DEMO / 'benchmarks/mmlu'}:mmlu", "--benchmark", f"c3={DEMO / 'benchmarks/c3'}:c3",
                   "--template", "cmmlu=cmmlu_lmeval", "--shots", "1",
                   "--max-questions-per-subject", "2", "--heldout", f"en={DEMO / 'heldout/en.jsonl'}",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["model"] == "model" and set(res["benchmarks"]) == {"cmmlu", "mmlu", "c3"}
    assert res["benchmarks"]["cmmlu"]["overall"]["n"] == 6  # 3 subjects x 2 questions
    assert res["benchmarks"]["cmmlu"]["template"]["name"] == "cmmlu_lmeval"
    assert res["benchmarks"]["mmlu"]["template"]["name"] == "mmlu"  # the layout's own
    assert res["benchmarks"]["c3"]["split"] == "dev" and res["benchmarks"]["c3"]["overall"]["n"] == 2
    assert res["heldout"]["en"]["bpc"] > 0 and res["heldout"]["en"]["bpb"] > 0
    assert "| cmmlu | first token | 6 |" in proc.stdout and "| en | bits/byte |" in proc.stdout
    bad = cptflow("eval", "--model", str(model), "--benchmark", f"mmlu={DEMO / 'benchmarks/mmlu'}:mmlu",
                  "--template", "cmmlu=cmmlu_lmeval")
    assert bad.returncode == 2 and "--template names no --benchmark: cmmlu" in bad.stderr


def test_run_plans_the_demo_from_any_directory(tmp_path):
    proc = cptflow("run", "--configfile", str(REPO / "config" / "demo.yaml"), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "delta_apply" in proc.stdout + proc.stderr and "This was a dry-run" in proc.stdout + proc.stderr
