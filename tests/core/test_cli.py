"""The stage command line (cptflow.core.cli.stage_main) as the rules call it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _clean_as_a_rule_runs_it(tmp_path: Path, log: Path) -> int:
    """Exactly the rule's shell: --log <file> and stderr appended to the same file (2>> <file>)."""
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "no lang field"}\n', encoding="utf-8")
    cmd = (f"{sys.executable} -m cptflow.data.clean --input {tmp_path / 'in.jsonl'} --output {tmp_path / 'o.jsonl'}"
           f" --dropped {tmp_path / 'd.jsonl'} --stats {tmp_path / 's.json'} --params '{{}}' --log {log} 2>> {log}")
    return subprocess.run(cmd, shell=True, env=dict(os.environ), timeout=120).returncode


def test_each_error_line_is_in_the_job_log_once(tmp_path):
    """Issue 14: every error line appeared twice (three times, in fact) in a job's log: logged to the
    file, logged to stderr (which the rule appends to the same file), and printed."""
    log = tmp_path / "clean.log"
    assert _clean_as_a_rule_runs_it(tmp_path, log) == 2
    lines = log.read_text(encoding="utf-8").splitlines()
    errors = [line for line in lines if "in.jsonl:1" in line]
    assert len(errors) == 1 and " ERROR cptflow.clean: clean failed: " in errors[0], lines
    assert len(lines) == len(set(lines)), lines  # and no other line twice
    # Run by hand (stderr a terminal or a pipe, not the log): the error reaches stderr once too.
    proc = subprocess.run([sys.executable, "-m", "cptflow.data.clean", "--input", str(tmp_path / "in.jsonl"),
                           "--output", str(tmp_path / "o.jsonl"), "--dropped", str(tmp_path / "d.jsonl"),
                           "--stats", str(tmp_path / "s.json"), "--log", str(tmp_path / "hand.log")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("in.jsonl:1") == 1
    assert (tmp_path / "hand.log").read_text().count("in.jsonl:1") == 1
