"""The ``cptflow`` command: what a user of a release runs without running the workflow.

    cptflow delta apply --base DIR --delta DIR --output DIR   rebuild a released model from its base (bit for bit)
    cptflow delta make --base DIR --adapted DIR --output-dir DIR
    cptflow eval --model DIR --benchmark NAME=PATH:LAYOUT ...  score any local model on benchmarks as published
    cptflow run [snakemake args]                              the workflow, with the local profile
    cptflow --version

Each subcommand is a thin front end: ``delta`` runs the same stage code the workflow's ``delta_make`` /
``delta_apply`` rules run, ``eval`` the ``evaluate`` stage, ``run`` Snakemake on this checkout's
Snakefile. Nothing here has logic of its own beyond turning flags into the stage's arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cptflow import __version__

REPO = Path(__file__).resolve().parents[2]  # src/cptflow/command.py -> the checkout (editable install)


DELTA_USAGE = """usage: cptflow delta {make,apply} [flags]   (cptflow delta apply --help for the flags)

  apply  rebuild the adapted model from its base and a release delta; every file is checked
         against the sha256 in the delta's manifest before the output is written
  make   write the release delta of an adapted model against its base"""


def _delta(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(DELTA_USAGE)
        return 0
    if argv[:1] == ["make"]:
        from cptflow.release import delta_make

        return delta_make.main(argv[1:], prog="cptflow delta make")
    if argv[:1] == ["apply"]:
        from cptflow.release import delta_apply

        return delta_apply.main(argv[1:], prog="cptflow delta apply")
    print(DELTA_USAGE, file=sys.stderr)
    return 2


def _eval(argv: list[str]) -> int:
    from cptflow.eval import compare, evaluate
    from cptflow.eval.benchmarks import parse_benchmark_arg

    p = argparse.ArgumentParser(prog="cptflow eval", description=(
        "Score a local Hugging Face model (safetensors) on multiple-choice benchmarks in their published "
        "layouts (ceval, cmmlu, mmlu, jsonl, c3, logiqa), in each benchmark's own prompt template, and, optionally, "
        "bits per character and per byte on held-out text."))
    p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH:LAYOUT",
                   help="a benchmark folder with <split>/ subfolders, e.g. ceval=data/ceval:ceval (repeatable)")
    p.add_argument("--template", action="append", default=[], metavar="NAME=TEMPLATE",
                   help="prompt template of benchmark NAME (default: its layout's official one), e.g. "
                        "cmmlu=cmmlu_lmeval for lm-evaluation-harness's stock prompt (repeatable)")
    p.add_argument("--heldout", action="append", default=[], metavar="NAME=PATH", help="held-out JSONL with 'text'")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples from the dev split (default 5)")
    p.add_argument("--max-questions-per-subject", type=int, default=0, help="0 = all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--name", default=None, help="label in the results (default: the model folder's name)")
    p.add_argument("--output", default=None, help="results JSON (default: print the table only)")
    p.add_argument("--log", default=None, help="log file")
    args = p.parse_args(argv)
    if not args.benchmark and not args.heldout:
        p.error("give at least one --benchmark or --heldout")
    chosen = dict(x.partition("=")[::2] for x in args.template)
    try:
        specs = [parse_benchmark_arg(b, shots=args.shots) for b in args.benchmark]
        unknown = sorted(set(chosen) - {s["name"] for s in specs})
        if unknown:
            raise ValueError(f"--template names no --benchmark: {', '.join(unknown)}")
        specs = [{**s, "template": chosen[s["name"]]} if s["name"] in chosen else s for s in specs]
    except ValueError as e:
        p.error(str(e))
    params = {"batch_size": args.batch_size, "max_questions_per_subject": args.max_questions_per_subject}
    name = args.name or Path(args.model).resolve().name
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output or str(Path(tmp) / "results.json")
        stage_argv = ["--model", args.model, "--name", name, "--benchmarks-json", json.dumps(specs), "--output", out,
                      "--stats", f"{out}.stats.json", "--params", json.dumps(params),
                      *(f"--heldout={h}" for h in args.heldout)]
        if args.log:
            stage_argv += ["--log", args.log]
        rc = evaluate.main(stage_argv)
        if rc == 0:
            with open(out, encoding="utf-8") as f:
                print(compare.compare([json.load(f)])[1])
            if args.output:
                print(f"results: {args.output}")
    return rc


def _run(argv: list[str]) -> int:
    snakefile = REPO / "Snakefile"
    if not snakefile.is_file():
        print(f"cptflow run: no Snakefile at {snakefile}: the workflow needs the repository checkout "
              "(git clone, then `bash .ci/demo` or `pip install -e .`)", file=sys.stderr)
        return 2
    # Run in the working directory (results/ lands there), with this checkout's Snakefile and local profile.
    where = [] if {"--directory", "-d"} & set(argv) else ["--directory", os.getcwd()]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(snakefile), *where,
           "--profile", str(REPO / "profiles" / "local"), *argv]
    return subprocess.call(cmd)


COMMANDS = {"delta": _delta, "eval": _eval, "run": _run}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage:\n" + __doc__.split("\n\n")[1]
    if argv[:1] in (["--version"], ["-V"]):
        print(f"cptflow {__version__}")
        return 0
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print((f"cptflow: unknown command {argv[0]!r}\n" if argv else "") + usage, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
