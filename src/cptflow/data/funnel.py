"""The data funnel: documents and characters in, kept and dropped (by reason) at every data stage.

Reads only the stage manifests (``*.stats.json``), never logs, sums them per stage in DAG order and
writes a JSON (for the report) and a markdown table (printed at the end of a run), so a person sees
at a glance where the corpus went.

It also holds the stages to account: for every file, what a stage read (``docs_in``) must be what
the stage before wrote (``docs_out`` of the manifest that lists the file among its outputs). A
difference means a file changed between the two jobs, and the funnel fails naming it. A category
that ends with no document at all fails the funnel too, naming the category and where each file's
documents went (``cptflow.data.diagnose.why_empty``): a source lost whole to a wrong text_field, an
encoding or a filter must not pass with exit code 0. One empty file of a category is only counted.

Disk: bytes written per stage (every output the manifests list) per byte of raw input, and whether
the stage's documents stay on disk (``--temporary`` names the stages whose documents the workflow
deletes once consumed, ``keep_intermediates: false``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptflow.core.io import atomic_path, read_json, write_json
from cptflow.core.provenance import upstream
from cptflow.data.diagnose import why_empty

VERSION = 2

STAGE_ORDER = ("ingest", "clean", "dedup", "decontaminate", "pii", "shards")
DISK_ORDER = ("ingest", "clean", "dedup_signature", "dedup_bands", "dedup_clusters", "dedup", "decontaminate",
              "pii", "shards")


def check_continuity(manifests: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Raise naming the file if a stage read another number of documents than its producer wrote."""
    producer: dict[str, tuple[str, dict[str, Any]]] = {}
    for path, m in manifests:
        for out in m.get("outputs") or {}:
            producer[os.path.normpath(out)] = (path, m)
    for path, m in manifests:
        found = {}
        for inp in m.get("inputs") or {}:
            p = producer.get(os.path.normpath(inp))
            if p is not None and p[0] != path:
                found[p[0]] = (inp, p[1])
        if not found:
            continue
        wrote = sum(pm["counts"].get("docs_out", 0) for _, pm in found.values())
        read = m["counts"].get("docs_in", 0)
        if read != wrote:
            files = ", ".join(inp for inp, _ in found.values())
            stages = "/".join(sorted({pm["stage"] for _, pm in found.values()}))
            raise ValueError(
                f"{m['stage']} read {int(read)} documents from {files} ({path}), but {stages} wrote {int(wrote)} "
                f"({', '.join(found)}): the file changed between the two jobs; delete it and rerun the workflow"
            )


def check_categories(manifests: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Raise naming every category whose shards hold no document, with why (``why_empty``)."""
    docs: dict[str, float] = defaultdict(int)
    files: dict[str, list[str]] = defaultdict(list)
    for _, m in manifests:
        if m["stage"] == "shards":
            cat = m["params"]["category"]
            docs[cat] += m["counts"].get("docs_out", 0)
            files[cat] += list(m.get("outputs") or {})
    empty = [why_empty(c, upstream(files[c])) for c in sorted(docs) if not docs[c]]
    if empty:
        raise ValueError("\n".join(empty))


def disk(manifests: Sequence[dict[str, Any]], temporary: Sequence[str]) -> dict[str, Any]:
    """Bytes written per stage and per byte of raw input (ingest's ``bytes_in``)."""
    written: dict[str, int] = defaultdict(int)
    for m in manifests:
        written[m["stage"]] += int(sum((m.get("output_bytes") or {}).values()))
    raw = int(sum(m["counts"].get("bytes_in", 0) for m in manifests if m["stage"] == "ingest"))
    stages = [s for s in DISK_ORDER if s in written] + sorted(set(written) - set(DISK_ORDER))
    return {"input_bytes": raw, "stages": [
        {"stage": s, "bytes_written": written[s], "per_input_byte": round(written[s] / raw, 4) if raw else None,
         "documents_kept": s not in temporary} for s in stages]}


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
    for stage in [s for s in STAGE_ORDER if s in per_stage]:  # (signatures, bands, ...: disk only)
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
    if funnel.get("disk", {}).get("stages"):
        d = funnel["disk"]
        lines += ["", f"Bytes written per stage, per byte of raw input ({d['input_bytes']} bytes):", "",
                  "| stage | bytes written | per input byte | documents kept on disk |", "|---|---:|---:|---|"]
        for s in d["stages"]:
            ratio = "-" if s["per_input_byte"] is None else f"{s['per_input_byte']:.3f}"
            lines.append(f"| {s['stage']} | {s['bytes_written']} | {ratio} | "
                         f"{'yes' if s['documents_kept'] else 'no (temporary)'} |")
    return "\n".join(lines) + "\n"


def run(stats_paths: Sequence[str], output_json: str, output_md: str, temporary: Sequence[str] = ()) -> dict[str, Any]:
    manifests = [(p, read_json(p)) for p in sorted(stats_paths)]
    check_continuity(manifests)
    check_categories(manifests)
    funnel = summarise([m for _, m in manifests])
    funnel["disk"] = disk([m for _, m in manifests], temporary)
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
    p.add_argument("--temporary", nargs="*", default=[], help="stages whose documents the workflow deletes once used")
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
    try:
        run(args.stats, args.output_json, args.output_md, args.temporary)
    except ValueError as e:
        print(f"cptflow funnel: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
