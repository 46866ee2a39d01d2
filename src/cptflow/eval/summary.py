"""Accuracy tables from per-question predictions: per subject, per category and overall, each with its
binomial standard error, and the per-question right/wrong strings that ``compare`` pairs across models."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from cptflow.eval.multiple_choice import SCORINGS
from cptflow.eval.uncertainty import binomial_se, macro_se


def accuracy(rows: list[dict]) -> dict[str, Any]:
    """n, accuracy and its standard error per scoring."""
    n = len(rows)
    acc = {s: sum(r[s] == r["answer"] for r in rows) / n if n else 0.0 for s in SCORINGS}
    return {"n": n, "accuracy": {s: round(v, 6) for s, v in acc.items()},
            "stderr": {s: round(binomial_se(v, n), 6) for s, v in acc.items()}}


def summarise(rows: list[dict], category: Callable[[str], str]) -> dict[str, Any]:
    """Accuracy per subject, per category and overall (micro over questions; macro over subjects too)."""
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r)
    by_cat: dict[str, list[dict]] = defaultdict(list)
    subjects = {}
    for s in sorted(by_subject):
        cat = category(s)
        by_cat[cat].extend(by_subject[s])
        subjects[s] = {"category": cat, **accuracy(by_subject[s])}
    overall = accuracy(rows)
    overall["macro_accuracy"] = {k: round(sum(v["accuracy"][k] for v in subjects.values()) / max(1, len(subjects)), 6)
                                 for k in SCORINGS}
    overall["macro_stderr"] = {k: round(macro_se([v["stderr"][k] for v in subjects.values()]), 6) for k in SCORINGS}
    return {"subjects": subjects, "categories": {c: accuracy(v) for c, v in sorted(by_cat.items())}, "overall": overall}


def correctness(rows: list[dict]) -> dict[str, Any]:
    """Question keys (subject/qid) in a fixed order and, per scoring, a '0'/'1' string of right answers.

    Compact (one character a question) and self-describing, so ``compare`` can pair two models'
    answers question by question from their results JSON alone.
    """
    ordered = sorted(rows, key=lambda r: (r["subject"], r["qid"]))
    return {"questions": [f"{r['subject']}/{r['qid']}" for r in ordered],
            **{s: "".join("1" if r[s] == r["answer"] else "0" for r in ordered) for s in SCORINGS}}
