"""Stage ``compare``: every evaluated model side by side (base first, then each training stage), as JSON and markdown.

Reads the results JSON that ``evaluate`` wrote for each model and joins them per benchmark, category
and subject (accuracy ± binomial standard error) and per held-out set (bits per character and per
byte, tokens per character). Each later model's difference from the first (the base) gets a seeded
paired-bootstrap interval over the questions both answered (``cptflow.eval.uncertainty``); a
difference whose interval holds 0 is marked as within noise, in the JSON and in the table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from cptflow.core.cli import stage_main
from cptflow.core.config import ConfigError, from_dict, to_dict
from cptflow.core.io import atomic_path, read_json, write_json
from cptflow.eval.multiple_choice import SCORINGS
from cptflow.eval.uncertainty import paired_bootstrap

VERSION = 2
LABELS = {"first_token": "first token", "option_loglik": "loglik", "option_loglik_norm": "loglik norm"}
HELDOUT = (("bpc", "bits/char"), ("bpb", "bits/byte"), ("tokens_per_char", "tokens/char"))


@dataclass(frozen=True)
class CompareConfig:
    bootstrap_samples: int = 1000  # paired-bootstrap resamples per difference
    seed: int = 0  # of the bootstrap (the run's top-level seed overrides it)
    confidence: float = 0.95  # of the difference intervals
    every_stage: bool = True  # the workflow evaluates every training stage's model (false: base and last only)

    def __post_init__(self) -> None:
        if self.bootstrap_samples < 100:
            raise ConfigError("compare.bootstrap_samples must be >= 100 (fewer give unstable interval ends)")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError("compare.confidence must be in [0.5, 1)")


def _levels(bench: dict[str, Any]) -> list[tuple[str, str, Any]]:
    out: list[tuple[str, str, Any]] = [("overall", "overall", lambda s: s["overall"])]
    out += [("category", c, lambda s, c=c: s["categories"].get(c)) for c in bench["categories"]]
    out += [("subject", k, lambda s, k=k: s["subjects"].get(k)) for k in bench["subjects"]]
    return out


def _cell(part: dict[str, Any] | None) -> dict[str, Any] | None:
    if not part:
        return None
    return {"n": part["n"], **part["accuracy"], "stderr": part.get("stderr", {})}


def differences(results: list[dict[str, Any]], bench: str, cfg: CompareConfig) -> list[dict[str, Any]]:
    """Each later model minus the first, per scoring, with a paired-bootstrap interval over shared questions."""
    base = results[0]["benchmarks"].get(bench)
    out = []
    for r in results[1:]:
        other = r["benchmarks"].get(bench)
        if not base or not other:
            continue
        a, b = base.get("correct"), other.get("correct")
        if not a or not b or a["questions"] != b["questions"]:
            out.append({"benchmark": bench, "model": r["model"], "paired": False,
                        "reason": "the two results do not hold the same questions"})
            continue
        for s in SCORINGS:
            boot = paired_bootstrap([int(c) for c in a[s]], [int(c) for c in b[s]], samples=cfg.bootstrap_samples,
                                    seed=cfg.seed, confidence=cfg.confidence)
            out.append({"benchmark": bench, "model": r["model"], "scoring": s, "paired": True, **boot})
    return out


def compare(results: list[dict[str, Any]], cfg: CompareConfig | None = None) -> tuple[dict[str, Any], str]:
    """Side-by-side table of several models' results (the first is the baseline): (JSON-able dict, markdown)."""
    cfg = cfg or CompareConfig()
    names = [r["model"] for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"compare: model names must differ, got {names}")
    rows: list[dict[str, Any]] = []
    diffs: list[dict[str, Any]] = []
    benches = sorted({b for r in results for b in r["benchmarks"]})
    for b in benches:
        first = next(r["benchmarks"][b] for r in results if b in r["benchmarks"])
        for level, key, get in _levels(first):
            rows.append({"benchmark": b, "level": level, "group": key,
                         "models": {r["model"]: _cell(get(r["benchmarks"][b])) if b in r["benchmarks"] else None
                                    for r in results}})
        diffs += differences(results, b, cfg)
    held = sorted({h for r in results for h in r["heldout"]})
    heldout = [{"set": h, "models": {r["model"]: {k: r["heldout"][h].get(k) for k, _ in HELDOUT}
                                     if h in r["heldout"] else None for r in results}} for h in held]
    table = {"models": names, "baseline": names[0], "final": names[-1], "accuracy": rows, "differences": diffs,
             "heldout": heldout, "bootstrap": to_dict(cfg),
             "templates": {b: {r["model"]: r["benchmarks"][b]["template"]["sha256"] for r in results
                               if b in r["benchmarks"]} for b in benches}}
    return table, markdown(table)


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _acc(m: dict[str, Any] | None, s: str) -> str:
    if not m:
        return "—"
    se = m.get("stderr", {}).get(s)
    return _pct(m[s]) + (f" ± {100 * se:.1f}" if se is not None else "")


def diff_text(d: dict[str, Any], verdict: bool = True) -> str:
    """'+3.3 [-5.0, +11.7] within noise' (points, interval at the configured confidence)."""
    if not d.get("paired"):
        return "not paired"
    text = f"{100 * d['delta']:+.1f} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]"
    return text + (" within noise" if verdict and d["within_noise"] else "")


def markdown(table: dict[str, Any]) -> str:
    names, base = table["models"], table["baseline"]
    later = names[1:]
    conf = round(100 * table["bootstrap"]["confidence"])
    by_key = {(d["benchmark"], d["model"], d.get("scoring")): d for d in table["differences"]}
    lines = ["## Multiple choice accuracy (%)", "",
             "first token = argmax over the option letters; loglik = log-likelihood of the option text (norm: per "
             "character). ± is the binomial standard error; Δ is each model minus "
             f"{base} in points with its {conf}% paired-bootstrap interval "
             f"({table['bootstrap']['bootstrap_samples']} resamples, seed {table['bootstrap']['seed']}); "
             "'within noise' when the interval holds 0.", ""]
    head = ["benchmark", "scoring", "n", *names, *(f"Δ {m} − {base}" for m in later)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in (r for r in table["accuracy"] if r["level"] == "overall"):
        ms = [row["models"][n] for n in names]
        n_q = next((m["n"] for m in ms if m), 0)
        for s in SCORINGS:
            dcells = []
            for m in later:
                d = by_key.get((row["benchmark"], m, s)) or by_key.get((row["benchmark"], m, None))
                dcells.append(diff_text(d) if d else "—")
            lines.append("| " + " | ".join([row["benchmark"], LABELS[s], str(n_q), *(_acc(m, s) for m in ms),
                                            *dcells]) + " |")
    lines += ["", "### By category and subject (first token / loglik / loglik norm, %)", "",
              "| benchmark | group | n | " + " | ".join(names) + " |", "|" + "---|" * (3 + len(names))]
    for row in table["accuracy"]:
        ms = [row["models"][n] for n in names]
        n_q = next((m["n"] for m in ms if m), 0)
        group = {"overall": f"**{row['group']}**", "subject": f"· {row['group']}"}.get(row["level"], row["group"])
        cells = [" / ".join(_pct(m[s]) for s in SCORINGS) if m else "—" for m in ms]
        lines.append("| " + " | ".join([row["benchmark"], group, str(n_q), *cells]) + " |")
    lines += ["", "## Held-out text (lower is better)", "", "| set | metric | " + " | ".join(names) + " |",
              "|" + "---|" * (2 + len(names))]
    for h in table["heldout"]:
        for key, label in HELDOUT:
            vals = [(h["models"][n] or {}).get(key) for n in names]
            lines.append("| " + " | ".join([h["set"], label, *("—" if v is None else f"{v:.4f}" for v in vals)]) + " |")
    return "\n".join(lines) + "\n"


def _build(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", nargs="+", required=True, help="results JSON of each model, base first")
    p.add_argument("--output-json", required=True)
    p.add_argument("--output-md", required=True)


def _run(args: argparse.Namespace, params: dict[str, Any]) -> None:
    cfg = from_dict(CompareConfig, params, "compare")
    table, md = compare([read_json(p) for p in args.results], cfg)
    write_json(args.output_json, table)
    with atomic_path(args.output_md) as tmp:
        tmp.write_text(md, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    return stage_main("compare", argv, _build, _run, "Put several models' evaluation results side by side.")


if __name__ == "__main__":
    sys.exit(main())
