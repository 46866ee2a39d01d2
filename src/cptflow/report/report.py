"""The run report: one markdown summary with plots, built only from the stages' JSON outputs.

Sections follow the DAG: data funnel, tokenizer compression, training curves per stage, evaluation
(the base and the model after each training stage, with standard errors, paired-bootstrap intervals
and scores along the stages) and the release manifest. The plots are PNGs beside ``summary.md``; the workflow
also registers them for ``snakemake --report`` (HTML) with captions from ``workflow/report/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptflow.core.io import atomic_path, read_json

VERSION = 3  # 3: the SFT section (what sft_pack kept, finetune's summary), 'the last model'

PLOTS = ("funnel.png", "training.png", "eval.png", "stages.png")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, out: Path) -> None:
    """Every plot of the report: laid out tight, 110 dpi PNG, figure closed (a run makes several)."""
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def plot_funnel(funnel: dict[str, Any], out: Path) -> None:
    plt = _plt()
    stages = funnel["stages"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [s["stage"] for s in stages]
    ax.bar(names, [s["chars_in"] / 1e6 for s in stages], color="#c8d6e5", label="characters in")
    ax.bar(names, [s["chars_out"] / 1e6 for s in stages], color="#2e86de", label="characters kept")
    ax.set_ylabel("million characters")
    ax.set_title("Data funnel")
    ax.legend(frameon=False)
    _save(plt, fig, out)


def plot_training(curves: dict[str, list[dict[str, Any]]], out: Path) -> None:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    offset = 0
    for name, rows in curves.items():
        rows = [r for r in rows if "loss" in r]
        if not rows:
            continue
        steps = [offset + r["step"] for r in rows]
        a.plot(steps, [r["loss"] for r in rows], label=name)
        if any("tokens_per_s" in r for r in rows):
            b.plot(steps, [r.get("tokens_per_s", float("nan")) for r in rows], label=name)
        offset = steps[-1]
    a.set_xlabel("step (stages concatenated)")
    a.set_ylabel("training loss")
    a.set_title("Loss per training stage")
    b.set_xlabel("step")
    b.set_ylabel("tokens/s")
    b.set_title("Throughput")
    for ax in (a, b):
        ax.legend(frameon=False, fontsize=8)
    _save(plt, fig, out)


def plot_eval(table: dict[str, Any], out: Path) -> None:
    plt = _plt()
    models = table["models"]
    overall = [r for r in table["accuracy"] if r["level"] == "overall"]
    held = table.get("heldout", [])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(overall))]
        a.bar(xs, [100 * (r["models"][m] or {}).get("first_token", 0) for r in overall], width, label=m)
        xs = [j + i * width for j in range(len(held))]
        b.bar(xs, [(h["models"][m] or {}).get("bpc", 0) for h in held], width, label=m)
    a.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(overall))], [r["benchmark"] for r in overall])
    a.set_ylabel("accuracy % (first-token)")
    a.axhline(25, color="grey", lw=0.8, ls="--")  # chance with four options
    a.set_title("Multiple choice")
    b.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(held))], [h["set"] for h in held])
    b.set_ylabel("bits per character (lower is better)")
    b.set_title("Held-out text")
    for ax in (a, b):
        ax.legend(frameon=False, fontsize=8)
    _save(plt, fig, out)


def plot_stages(table: dict[str, Any], out: Path) -> None:
    """Scores along the stages (Colossal-LLaMA-2 style): bits/char per held-out set and accuracy per benchmark,
    one point per evaluated model in training order, accuracy with ±1 standard error bars."""
    from cptflow.eval.compare import LABELS

    plt = _plt()
    models = table["models"]
    xs = list(range(len(models)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for h in table.get("heldout", []):
        a.plot(xs, [(h["models"][m] or {}).get("bpc", float("nan")) for m in models], marker="o", label=h["set"])
    overall = [r for r in table["accuracy"] if r["level"] == "overall"]
    for i, r in enumerate(overall):
        for s, style, dx in (("first_token", "-", -0.03), ("option_loglik", "--", 0.03)):  # dx: bars side by side
            cells = [r["models"][m] or {} for m in models]
            b.errorbar([x + dx for x in xs], [100 * c.get(s, float("nan")) for c in cells],
                       yerr=[100 * c.get("stderr", {}).get(s, 0.0) for c in cells], ls=style, marker="o",
                       color=f"C{i}", capsize=3, label=f"{r['benchmark']} {LABELS[s]}")
    for ax in (a, b):
        ax.set_xticks(xs, models, rotation=15)
        ax.legend(frameon=False, fontsize=7)
    a.set_ylabel("bits per character (lower is better)")
    a.set_title("Held-out text along the stages")
    b.set_ylabel("accuracy % (± 1 s.e.)")
    b.set_title("Multiple choice along the stages")
    _save(plt, fig, out)


def noise_lines(table: dict[str, Any]) -> list[str]:
    """One sentence per benchmark and scoring: the final model's difference from the base, and whether it is noise."""
    from cptflow.eval.compare import LABELS, diff_text

    final, base = table["final"], table["baseline"]
    out = []
    for d in table.get("differences", []):
        if d["model"] != final or not d.get("paired"):
            continue
        verdict = ("within noise: the interval holds 0, so this run does not show a difference" if d["within_noise"]
                   else "outside noise at this confidence")
        delta = diff_text(d, verdict=False)
        out.append(f"- {d['benchmark']}, {LABELS[d['scoring']]}: {final} − {base} = {delta} points "
                   f"(n = {d['n']}; {verdict}).")
    return out


def sft_lines(counts: dict[str, Any], stats: dict[str, Any]) -> list[str]:
    """What SFT trained on and how: sft_pack's counts and finetune's summary (from their JSON outputs)."""
    s = stats.get("summary", {})
    fit = ", ".join(f"{k} {v}" for k, v in sorted(counts.get("fit", {}).items())) or "-"
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(counts.get("dropped", {}).items())) or "none"
    method = s.get("method", "?") + (f" (requested {s['method_requested']})"
                                     if s.get("method_requested") not in (None, s.get("method")) else "")
    loss = f"{s['final_loss']:.3f}" if isinstance(s.get("final_loss"), (int, float)) else "-"
    return ["## 6. Supervised fine-tuning", "",
            f"{counts.get('conversations', 0)} conversations in {counts.get('rows', 0)} rows of "
            f"{counts.get('max_length', '?')} tokens (fill {100 * counts.get('fill', 0):.1f}%), "
            f"{counts.get('loss_tokens', 0)} of {counts.get('tokens', 0)} tokens in the loss (the assistant turns); "
            f"fit: {fit}; dropped: {dropped}. Chat template: {counts.get('chat_template_origin', '?')} "
            f"(sha256 `{str(counts.get('chat_template_sha256', ''))[:16]}`).", "",
            f"Method {method}, engine {s.get('engine', '?')}, {s.get('trainable_params', '?')} of "
            f"{s.get('params', '?')} parameters trained, {s.get('total_steps', '?')} steps of {s.get('global_batch', '?')}"
            f" rows; final loss {loss} (its curve is the `sft` line of section 3).", ""]


def build(args: argparse.Namespace) -> str:
    """Write plots into the output dir and return the markdown summary."""
    out = Path(args.output_dir)
    from cptflow.tokenizer.compression import markdown_table
    from cptflow.data.funnel import to_markdown

    parts = [f"# cptflow run report: {args.run_name}", ""]
    funnel = read_json(args.funnel)
    plot_funnel(funnel, out / "funnel.png")
    parts += ["## 1. Data funnel", "", "![funnel](funnel.png)", "", to_markdown(funnel)]
    if args.compression:
        comp = read_json(args.compression)
        parts += ["## 2. Tokenizer compression (held-out text)", "", markdown_table(comp), ""]
    curves = {}
    for item in args.train_metrics:
        name, path = item.split("=", 1)
        curves[name] = read_metrics(path)
    if curves:
        plot_training(curves, out / "training.png")
        parts += ["## 3. Continual pre-training" + (" and supervised fine-tuning" if args.sft_stats else ""), "",
                  "![training](training.png)", "",
                  "| stage | steps | first loss | last loss | tokens seen | mean tokens/s | skipped steps |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, rows in curves.items():
            rows = [r for r in rows if "loss" in r]
            if rows:
                tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
                parts.append(f"| {name} | {rows[-1]['step']} | {rows[0]['loss']:.3f} | {rows[-1]['loss']:.3f} | "
                             f"{rows[-1].get('tokens_seen', '')} | {sum(tps) / len(tps) if tps else 0:.0f} | "
                             f"{sum(1 for r in rows if r.get('skipped'))} |")
        parts.append("")
    if args.compare:
        table = read_json(args.compare)
        plot_eval(table, out / "eval.png")
        plot_stages(table, out / "stages.png")
        md = Path(args.compare).with_suffix(".md")
        conf = round(100 * table.get("bootstrap", {}).get("confidence", 0.95))
        parts += [f"## 4. Evaluation: {', '.join(table['models'])}", "", "![eval](eval.png)", "",
                  "![stages](stages.png)", "", f"{table['final']} (the last model) against {table['baseline']}, "
                  f"{conf}% paired-bootstrap intervals:", "", *noise_lines(table), ""]
        parts += [md.read_text(encoding="utf-8") if md.exists() else "", ""]
    if args.delta_manifest:
        man = read_json(args.delta_manifest)
        files = (man.get("adapted") or {}).get("files") or {}
        parts += ["## 5. Release (delta weights)", "",
                  f"Scheme: `{man.get('scheme', '?')}`; the delta was applied to the base and reproduced every file of "
                  "the adapted model bit for bit (checked by sha256 in the `delta_apply` stage).", ""]
        if isinstance(files, dict) and files:
            parts += ["| adapted model file | sha256 |", "|---|---|"]
            for name, meta in sorted(files.items()):
                digest = meta.get("sha256") if isinstance(meta, dict) else meta
                parts.append(f"| {name} | `{digest}` |")
            parts.append("")
    if args.sft_counts and args.sft_stats:
        parts += sft_lines(read_json(args.sft_counts), read_json(args.sft_stats))
    for section in args.section:  # sections other stages write (e.g. sft/generations.md), as they are
        parts += [Path(section).read_text(encoding="utf-8"), ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the markdown + PNG report of a cptflow run.")
    p.add_argument("--run-name", required=True)
    p.add_argument("--funnel", required=True)
    p.add_argument("--compression")
    p.add_argument("--train-metrics", nargs="*", default=[], metavar="STAGE=metrics.jsonl")
    p.add_argument("--compare", help="compare.json of the eval stage (compare.md beside it)")
    p.add_argument("--delta-manifest")
    p.add_argument("--sft-counts", help="sft_pack's counts.json")
    p.add_argument("--sft-stats", help="finetune's manifest (its summary)")
    p.add_argument("--section", action="append", default=[], help="a markdown file appended as it is (repeat)")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    with atomic_path(args.output_dir) as tmp:
        tmp.mkdir(parents=True)
        args.output_dir = str(tmp)
        (tmp / "summary.md").write_text(build(args), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
