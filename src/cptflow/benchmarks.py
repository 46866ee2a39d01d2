"""Reading multiple-choice benchmarks in their original file layouts.

Users hold C-Eval, CMMLU and MMLU as the projects publish them, so we read those layouts as they are
rather than asking for a conversion step:

* ``ceval``: ``<split>/<subject>_<split>.csv`` with header ``id,question,A,B,C,D,answer[,explanation]``
  (the test split has no ``answer``: its labels were never published, so score ``val``);
* ``cmmlu``: ``<split>/<subject>.csv`` with header ``,Question,A,B,C,D,Answer`` (first column a row index);
* ``mmlu``: ``<split>/<subject>_<split>.csv`` with no header: ``question,A,B,C,D,answer``;
* ``jsonl``: AGIEval/GAOKAO style, one object per line with ``question``, ``options`` (list of 2 to 10,
  optionally prefixed ``(A)``), ``label`` (letter among the options'), in ``<split>/<subject>.jsonl``.

A benchmark is a config entry (name, path, layout, language, shots, splits); adding one needs no code.
Both decontamination (questions as text) and evaluation (questions with answers) read through here.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

LETTERS = ("A", "B", "C", "D")  # the CSV layouts have exactly four options
JSONL_LETTERS = "ABCDEFGHIJ"  # jsonl layouts may have more (AGIEval has five)
LAYOUTS = ("ceval", "cmmlu", "mmlu", "jsonl")


@dataclass(frozen=True)
class Question:
    benchmark: str
    subject: str
    split: str
    qid: str
    question: str
    options: tuple[str, ...]
    answer: str | None  # a letter, or None where labels are unpublished

    def text(self) -> str:
        """Question and options as one string (what decontamination matches against)."""
        return "\n".join([self.question, *self.options])


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    path: str
    layout: str
    lang: str = "zh"
    shots: int = 5
    dev_split: str = "dev"
    eval_split: str = "val"
    subjects: list[str] = field(default_factory=list)  # empty: every subject found
    categories: dict[str, str] = field(default_factory=dict)  # subject -> category

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"benchmark {self.name}: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")


def _subject_of(path: Path, layout: str, split: str) -> str:
    stem = path.stem
    if layout in ("ceval", "mmlu") and stem.endswith(f"_{split}"):
        return stem[: -len(split) - 1]
    return stem


def subject_files(spec: BenchmarkSpec, split: str) -> list[tuple[str, Path]]:
    """(subject, file) pairs of one split, sorted by subject; a missing split folder is an error."""
    folder = Path(spec.path) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark {spec.name}: no split folder {folder}")
    ext = ".jsonl" if spec.layout == "jsonl" else ".csv"
    out = []
    for p in sorted(folder.glob(f"*{ext}")):
        subject = _subject_of(p, spec.layout, split)
        if spec.subjects and subject not in spec.subjects:
            continue
        out.append((subject, p))
    return out


def read_questions(spec: BenchmarkSpec, split: str) -> Iterator[Question]:
    for subject, path in subject_files(spec, split):
        yield from read_file(spec, subject, split, path)


def read_file(spec: BenchmarkSpec, subject: str, split: str, path: Path) -> Iterator[Question]:
    if spec.layout == "jsonl":
        yield from _read_jsonl(spec, subject, split, path)
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
            q = (obj.get("passage") or "") + obj["question"]
            yield Question(spec.name, subject, split, str(obj.get("id", lineno)), q, opts, ans)
