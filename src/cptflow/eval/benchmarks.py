"""Reading multiple-choice benchmarks in their original file layouts.

Users hold C-Eval, CMMLU, MMLU, C3 and LogiQA as the projects publish them, so we read those layouts
as they are rather than asking for a conversion step:

* ``ceval``: ``<split>/<subject>_<split>.csv`` with header ``id,question,A,B,C,D,answer[,explanation]``
  (the test split has no ``answer``: its labels were never published, so score ``val``);
* ``cmmlu``: ``<split>/<subject>.csv`` with header ``,Question,A,B,C,D,Answer`` (first column a row index);
* ``mmlu``: ``<split>/<subject>_<split>.csv`` with no header: ``question,A,B,C,D,answer``;
* ``jsonl``: AGIEval/GAOKAO style, one object per line with ``question``, ``options`` (list of 2 to 10,
  optionally prefixed ``(A)``), ``label`` (letter among the options'), optional ``passage``, in
  ``<split>/<subject>.jsonl``;
* ``c3`` and ``logiqa``: passage (or dialogue) + question + 2-4 options (``cptflow.eval.passages``).

A benchmark is a config entry (name, path, layout, language, shots, splits, template); adding one needs
no code. Both decontamination (questions as text) and evaluation (questions with answers) read through here.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

from cptflow.eval import passages
from cptflow.eval.questions import JSONL_LETTERS, LAYOUTS, LETTERS, BenchmarkSpec, Question

__all__ = ["BenchmarkSpec", "Question", "LAYOUTS", "has_split", "read_questions", "subject_files",
           "parse_benchmark_arg"]
# Layouts whose split is part of the file name, all files in the benchmark's folder (as their projects publish).
_FLAT = {"c3": passages.c3_files, "logiqa": passages.logiqa_files}


def _subject_of(path: Path, layout: str, split: str) -> str:
    stem = path.stem
    if layout in ("ceval", "mmlu") and stem.endswith(f"_{split}"):
        return stem[: -len(split) - 1]
    return stem


def has_split(spec: BenchmarkSpec, split: str) -> bool:
    """Whether the benchmark has this split (a sub-folder, or for C3/LogiQA files named after it)."""
    if spec.layout in _FLAT:
        return bool(_FLAT[spec.layout](Path(spec.path), split))
    return (Path(spec.path) / split).is_dir()


def subject_files(spec: BenchmarkSpec, split: str) -> list[tuple[str, Path]]:
    """(subject, file) pairs of one split, sorted by subject; a missing split is an error."""
    if spec.layout in _FLAT:
        found = _FLAT[spec.layout](Path(spec.path), split)
        if not found:
            raise FileNotFoundError(f"benchmark {spec.name}: no {spec.layout} file of split {split!r} in {spec.path}")
    else:
        folder = Path(spec.path) / split
        if not folder.is_dir():
            raise FileNotFoundError(f"benchmark {spec.name}: no split folder {folder}")
        ext = ".jsonl" if spec.layout == "jsonl" else ".csv"
        found = [(_subject_of(p, spec.layout, split), p) for p in sorted(folder.glob(f"*{ext}"))]
    return [(s, p) for s, p in found if not spec.subjects or s in spec.subjects]


def read_questions(spec: BenchmarkSpec, split: str) -> Iterator[Question]:
    for subject, path in subject_files(spec, split):
        yield from read_file(spec, subject, split, path)


def read_file(spec: BenchmarkSpec, subject: str, split: str, path: Path) -> Iterator[Question]:
    if spec.layout in ("jsonl", "c3", "logiqa"):
        reader = {"jsonl": _read_jsonl, "c3": passages.read_c3, "logiqa": passages.read_logiqa}[spec.layout]
        yield from reader(spec, subject, split, path)
        return
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if spec.layout == "mmlu":
        header, body, start = None, rows, 1
    else:
        header, body, start = rows[0], rows[1:], 2
    for i, row in enumerate(body):
        lineno = i + start
        where = f"{path}:{lineno}"
        if spec.layout == "ceval":
            cols = {name.strip(): j for j, name in enumerate(header or [])}
            for need in ("id", "question", *LETTERS):
                if need not in cols:
                    raise ValueError(f"{path}: C-Eval header lacks column {need!r}")
            qid, q = row[cols["id"]], row[cols["question"]]
            opts = tuple(row[cols[c]] for c in LETTERS)
            ans = row[cols["answer"]].strip() if "answer" in cols and cols["answer"] < len(row) else None
        elif spec.layout == "cmmlu":
            if len(row) < 7:
                raise ValueError(f"{where}: CMMLU row has {len(row)} columns, expected 7")
            qid, q, opts, ans = row[0], row[1], tuple(row[2:6]), row[6].strip()
        else:
            if len(row) < 6:
                raise ValueError(f"{where}: MMLU row has {len(row)} columns, expected 6")
            qid, q, opts, ans = str(i), row[0], tuple(row[1:5]), row[5].strip()
        if ans is not None and ans not in LETTERS:
            raise ValueError(f"{where}: answer {ans!r} is not one of A-D")
        yield Question(spec.name, subject, split, str(qid), q, opts, ans or None)


_OPTION_PREFIX = re.compile(r"^\s*\(?[A-J][).．、:]\s*")


def _read_jsonl(spec: BenchmarkSpec, subject: str, split: str, path: Path) -> Iterator[Question]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                opts = tuple(_OPTION_PREFIX.sub("", o) for o in obj["options"])
                label = obj.get("label")
                ans = label[0] if isinstance(label, list) and label else label
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a benchmark record ({e})") from e
            if not 2 <= len(opts) <= len(JSONL_LETTERS):
                raise ValueError(f"{path}:{lineno}: {len(opts)} options, expected 2 to {len(JSONL_LETTERS)}")
            if ans is not None and ans not in JSONL_LETTERS[: len(opts)]:
                raise ValueError(f"{path}:{lineno}: label {ans!r} is not one of A-{JSONL_LETTERS[len(opts) - 1]}")
            yield Question(spec.name, subject, split, str(obj.get("id", lineno)), obj["question"], opts, ans,
                           passage=obj.get("passage") or "")


# What each published layout means when a user names only a folder (``cptflow eval --benchmark``): its
# language, and the splits (C-Eval's test labels were never published, so its val split; C3 and LogiQA
# take their shots from train).
LAYOUT_DEFAULTS = {
    "ceval": {"lang": "zh", "eval_split": "val"},
    "cmmlu": {"lang": "zh", "eval_split": "test"},
    "mmlu": {"lang": "en", "eval_split": "test"},
    "jsonl": {"lang": "zh", "eval_split": "test"},
    "c3": {"lang": "zh", "eval_split": "dev", "dev_split": "train"},
    "logiqa": {"lang": "zh", "eval_split": "test", "dev_split": "train"},
}


def parse_benchmark_arg(text: str, shots: int | None = None) -> dict:
    """``NAME=PATH:LAYOUT`` (e.g. ``cmmlu=data/cmmlu:cmmlu``) → a benchmark spec dict with the layout's defaults
    (zero-shot when the folder has no split to take shots from)."""
    name, sep, rest = text.partition("=")
    path, sep2, layout = rest.rpartition(":")
    if not (sep and sep2 and name and path and layout):
        raise ValueError(f"--benchmark {text!r}: expected NAME=PATH:LAYOUT, e.g. cmmlu=data/cmmlu:cmmlu")
    if layout not in LAYOUT_DEFAULTS:
        raise ValueError(f"--benchmark {text!r}: layout {layout!r} is not one of {', '.join(LAYOUT_DEFAULTS)}")
    if not Path(path).is_dir():
        raise ValueError(f"--benchmark {text!r}: {path} is not a directory")
    spec = {"name": name, "path": path, "layout": layout, **LAYOUT_DEFAULTS[layout]}
    if shots is not None:
        spec["shots"] = shots
    if not has_split(BenchmarkSpec(name, path, layout), spec.get("dev_split", "dev")):
        spec["shots"] = 0  # nothing to take shots from (e.g. C3's dev file alone): zero-shot, recorded as such
    return spec
