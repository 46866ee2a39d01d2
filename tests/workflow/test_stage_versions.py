"""Stage code versions reach the rules: bumping a stage module's VERSION reruns that stage (dry-run reasons).

The workflow is copied (Snakefile, workflow/, config/, src/) so that a VERSION can be bumped in the copy's
source; the jobs themselves run the installed package, which is the same code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEMO, REPO
from cptflow.core.versions import stage_version

pytestmark = pytest.mark.slow


def snakemake(root: Path, work: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"), "--directory", str(work),
           "--configfile", str(work / "config.yaml"), "--cores", "1", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def planned(proc: subprocess.CompletedProcess) -> dict[str, list[str]]:
    """rule -> reasons of every job a dry run plans."""
    out: dict[str, list[str]] = {}
    rule = None
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line)
        if m:
            rule = m.group(1)
        m = re.match(r"^\s+reason: (.*)$", line)
        if m and rule:
            out.setdefault(rule, []).append(m.group(1))
            rule = None
    return out


def test_every_rule_passes_its_stage_version():
    """Each rule's shell runs one stage module, and its params carry that module's VERSION."""
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = smk.read_text(encoding="utf-8")
        for block in re.split(r"(?m)^(?=(?:rule|checkpoint) \w+:)", text)[1:]:
            name = re.match(r"(?:rule|checkpoint) (\w+):", block).group(1)
            module = re.search(r"python -m (cptflow[\w.]+)", block).group(1)
            if module == "cptflow.train.launch":  # the launcher runs its --module (default: the train stage)
                named = re.search(r"cptflow\.train\.launch --module (cptflow[\w.]+)", block)
                module = named.group(1) if named else "cptflow.train.train"
            assert f'version=stage_version("{module}")' in block, f"rule {name} ({smk.name}) lacks its VERSION"
            assert stage_version(module, REPO / "src") >= 1


def test_bumping_a_stage_version_reruns_that_stage(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "Snakefile", root / "Snakefile")
    for part in ("workflow", "config", "src", "envs", "profiles"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    work = tmp_path / "work"
    (work / "corpus").mkdir(parents=True)
    lines = (DEMO / "corpus/zh_web/cmrc2018_dev.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    (work / "corpus" / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (work / "config.yaml").write_text(
        "run: versions\nsources:\n  - {name: zh, category: zh, paths: [corpus/*.jsonl], lang: zh}\n"
        "benchmarks: []\nheldout: {}\n", encoding="utf-8")
    snakemake(root, work, "--until", "clean")
    assert planned(snakemake(root, work, "--until", "clean", "--dry-run")) == {}

    module = root / "src/cptflow/data/ingest.py"
    text = module.read_text(encoding="utf-8")
    old = stage_version("cptflow.data.ingest", root / "src")
    module.write_text(text.replace(f"VERSION = {old}\n", f"VERSION = {old + 1}\n", 1), encoding="utf-8")
    jobs = planned(snakemake(root, work, "--until", "clean", "--dry-run"))
    assert set(jobs) == {"ingest", "clean"}, jobs
    assert any("Params have changed" in r for r in jobs["ingest"]), jobs["ingest"]
    assert not any("Params have changed" in r for r in jobs["clean"]), jobs["clean"]  # reruns for its new input
