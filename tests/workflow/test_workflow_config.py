"""The run config as the real `snakemake` reads it: no silent fallbacks, every problem at start.

Dry runs only (a second or two each), from a temporary working directory.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO

pytestmark = pytest.mark.slow
WEB = DEMO / "corpus/zh_web/cmrc2018_dev.jsonl"


def dry_run(work: Path, config: str | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", "1", "--dry-run", "--printshellcmds"]
    if config is not None:
        (work / "my.yaml").write_text(config, encoding="utf-8")
        cmd += ["--configfile", str(work / "my.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    proc.out = proc.stdout + proc.stderr  # snakemake prints a failed parse's error on stdout
    return proc


SOURCES = f"run: mine\nsources:\n  - {{name: web, category: web, paths: ['{WEB}'], lang: zh}}\n"


def test_demo_data_never_runs_behind_a_users_back(tmp_path):
    """Issue 14: the Snakefile loaded config/config.yaml as the base config, so a user config that
    omitted sources, benchmarks or heldout silently ran on the demo corpus, benchmarks and held-out
    text. Now nothing is filled in but the schema's defaults, and those three have none."""
    proc = dry_run(tmp_path, SOURCES)
    assert proc.returncode != 0
    assert "config key 'benchmarks' is required (it has no default)" in proc.out
    assert "config key 'heldout' is required (it has no default)" in proc.out
    proc = dry_run(tmp_path, "run: mine\nbenchmarks: []\nheldout: {}\n")
    assert proc.returncode != 0 and "config key 'sources' is required" in proc.out
    proc = dry_run(tmp_path, None)
    assert proc.returncode != 0 and "no run config: pass one with --configfile" in proc.out
    # Explicitly none: the run plans the user's one file only, and says what the empty lists turn off.
    proc = dry_run(tmp_path, SOURCES + "benchmarks: []\nheldout: {}\n")
    assert proc.returncode == 0, proc.out[-3000:]
    out = proc.out
    assert "workflow/resources/demo/corpus/zh_books" not in out and "zh_books" not in out
    assert out.count("rule ingest:") == 1 and str(WEB) in out
    assert "WARNING: config: benchmarks is empty" in out and "WARNING: config: heldout names no file" in out


def test_late_config_errors_fail_at_start_naming_the_key(tmp_path):
    """Issue 14: an unknown decontaminate.benchmarks name and a missing benchmark path failed only
    after the dedup jobs had run; bands x rows != num_perm was a bare ValueError. Now the dry run
    (before any job) fails with every problem, each line naming its key."""
    bench = DEMO / "benchmarks"
    config = SOURCES + (
        f"benchmarks:\n  - {{name: cmmlu, path: {bench / 'cmmlu'}, layout: cmmlu, lang: zh, eval_split: test}}\n"
        f"  - {{name: mmlu, path: {tmp_path / 'no_mmlu'}, layout: mmlu, lang: en, eval_split: test}}\n"
        "heldout: {}\ndecontaminate: {benchmarks: [cmmlu, ceval]}\ndedup: {bands: 10}\n")
    proc = dry_run(tmp_path, config)
    assert proc.returncode != 0
    err = proc.out
    assert "config has problems (each line names its key)" in err
    assert "dedup: bands * rows must equal num_perm (10 * 6 != 120)" in err
    assert f"benchmarks[1] (mmlu).path: benchmark folder '{tmp_path / 'no_mmlu'}' does not exist" in err
    assert "decontaminate.benchmarks: unknown benchmark name(s) ['ceval']" in err
    assert "rule ingest" not in err  # nothing was planned, let alone run


def test_after_a_killed_run_the_docs_say_unlock_and_rerun_incomplete():
    """Issue 14: nothing said that a killed Snakemake needs --unlock. The README and both profiles do."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### After a killed run", 1)[1].split("\n## ", 1)[0]
    assert "snakemake --unlock" in section and "--rerun-incomplete" in section and ".tmp-" in section
    for profile in ("local", "slurm"):
        text = (REPO / "profiles" / profile / "config.yaml").read_text(encoding="utf-8")
        assert "--unlock" in text and "rerun-incomplete: true" in text, profile
