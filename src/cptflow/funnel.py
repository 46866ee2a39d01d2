"""The data funnel: documents and characters in, kept and dropped (by reason) at every data stage.

Reads only the stage manifests (``*.stats.json``), never logs, sums them per stage in DAG order and
writes a JSON (for the report) and a markdown table (printed at the end of a run), so a person sees
at a glance where the corpus went.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptflow.io import atomic_path, read_json, write_json

STAGE_ORDER = ("ingest", "clean", "dedup", "decontaminate", "pii", "shards")


def summarise(manifests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    per_stage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(int))
    per_category: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(int))
    for m in manifests:
        stage = m["stage"]
        for k, v in m["counts"].items():
            per_stage[stage][k] += v
        if stage == "shards":
            cat = m["params"]["category"]
            per_category[cat]["docs"] += m["counts"].get("docs_out", 0)
            per_category[cat]["chars"] += m["counts"].get("chars_out", 0)
    stages = []
    for stage in [s for s in STAGE_ORDER if s in per_stage] + sorted(set(per_stage) - set(STAGE_ORDER)):
        c = per_stage[stage]
        dropped = {k.split("/", 1)[1]: c[k] for k in sorted(c) if k.startswith("dropped/")}
        dropped_chars = {k.split("/", 1)[1]: c[k] for k in sorted(c) if k.startswith("dropped_chars/")}
        stages.append({
            "stage": stage,
            "docs_in": c.get("docs_in", 0), "docs_out": c.get("docs_out", 0),
            "chars_in": c.get("chars_in", 0), "chars_out": c.get("chars_out", 0),
            "dropped": dropped, "dropped_chars": dropped_chars,
            "other": {k: c[k] for k in sorted(c) if not k.startswith(("dropped", "docs_", "chars_"))},
        })
    return {"stages": stages, "categories": {k: dict(v) for k, v in sorted(per_category.items())}}


def to_markdown(funnel: dict[str, Any]) -> str:
    lines = ["| stage | docs in | docs kept | kept % | chars in | chars kept | dropped (docs) by reason |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for s in funnel["stages"]:
        pct = 100.0 * s["docs_out"] / s["docs_in"] if s["docs_in"] else 0.0
        reasons = ", ".join(f"{k} {int(v)}" for k, v in s["dropped"].items() if v) or "-"
        lines.append(f"| {s['stage']} | {int(s['docs_in'])} | {int(s['docs_out'])} | {pct:.1f} | "
                     f"{int(s['chars_in'])} | {int(s['chars_out'])} | {reasons} |")
    if funnel["categories"]:
        lines += ["", "| category | documents | characters |", "|---|---:|---:|"]
        for cat, c in funnel["categories"].items():
            lines.append(f"| {cat} | {int(c['docs'])} | {int(c['chars'])} |")
    return "\n".join(lines) + "\n"


def run(stats_paths: Sequence[str], output_json: str, output_md: str) -> dict[str, Any]:
    funnel = summarise([read_json(p) for p in sorted(stats_paths)])
    write_json(output_json, funnel)
    with atomic_path(output_md) as tmp:
        tmp.write_text(to_markdown(funnel), encoding="utf-8")
    return funnel


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Summarise the data funnel of a run, or print it (--run-dir).")
    p.add_argument("--stats", nargs="*", default=[], help="stage manifests (*.stats.json)")
    p.add_argument("--output-json")
    p.add_argument("--output-md")
    p.add_argument("--run-dir", help="print the funnel of an existing run (results/<run>) and where its outputs are")
    args = p.parse_args(argv)
    if args.run_dir:
        md = Path(args.run_dir) / "data" / "funnel.md"
        if not md.exists():
            print(f"no funnel at {md}: has the run finished?", file=sys.stderr)
            return 1
        print(f"\nData funnel of {args.run_dir} ({md}):\n")
        print(md.read_text(encoding="utf-8"))
        print(f"Outputs are under {Path(args.run_dir).resolve()}; logs under {Path(args.run_dir) / 'logs'}.")
        return 0
    if not (args.output_json and args.output_md):
        p.error("--output-json and --output-md are required with --stats")
    run(args.stats, args.output_json, args.output_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
