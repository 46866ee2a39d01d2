"""Reading-comprehension layouts: a passage (or dialogue), a question and 2-4 options, as published.

* ``c3`` (nlpdata/c3): ``c3-<subject>-<split>.json`` side by side in one folder (subject ``m`` mixed
  genre, ``d`` dialogue; splits train/dev/test). Each file is a list of ``[passage lines, questions,
  id]`` with questions ``{"question", "choice": [2-4 texts], "answer": <the right text>}``; the
  passage lines (dialogue turns in C3-D) are joined with newlines.
* ``logiqa`` (lgw863/LogiQA-dataset): ``Train.txt``/``Eval.txt``/``Test.txt`` (English, subject ``en``)
  and ``zh_train.txt``/``zh_eval.txt``/``zh_test.txt`` (Chinese, subject ``zh``); records separated by a
  blank line: the answer letter (a-d), the passage, the question, four ``A.`` .. ``D.`` option lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from cptflow.eval.questions import JSONL_LETTERS, BenchmarkSpec, Question


def c3_files(folder: Path, split: str) -> list[tuple[str, Path]]:
    pat = re.compile(rf"c3-(\w+)-{re.escape(split)}\.json")
    return [(m.group(1), p) for p in sorted(folder.glob("c3-*.json")) if (m := pat.fullmatch(p.name))]


def logiqa_files(folder: Path, split: str) -> list[tuple[str, Path]]:
    out = []
    for p in sorted(folder.glob("*.txt")):
        stem = p.stem.lower()
        if stem == split.lower():
            out.append(("en", p))
        elif stem == f"zh_{split.lower()}":
            out.append(("zh", p))
    return sorted(out)


def read_c3(spec: BenchmarkSpec, subject: str, split: str, path: Path) -> Iterator[Question]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        try:
            lines, items, rid = rec
            passage = "\n".join(lines)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: expected [passage lines, questions, id] ({e})") from e
        for k, item in enumerate(items):
            try:
                opts, ans = tuple(item["choice"]), item.get("answer")
                question = item["question"]
            except (KeyError, TypeError) as e:
                raise ValueError(f"{where} ({rid}) question {k}: not a C3 question ({e})") from e
            if not 2 <= len(opts) <= len(JSONL_LETTERS):
                raise ValueError(f"{where} ({rid}) question {k}: {len(opts)} choices, "
                                 f"expected 2 to {len(JSONL_LETTERS)}")
            if ans is not None and ans not in opts:
                raise ValueError(f"{where} ({rid}) question {k}: answer {ans!r} is not one of the choices")
            letter = None if ans is None else JSONL_LETTERS[opts.index(ans)]
            yield Question(spec.name, subject, split, f"{rid}-{k}", question, opts, letter, passage=passage)


_LOGIQA_OPTION = re.compile(r"^\s*([A-Da-d])\s*[.．，,、:：]\s*")


def read_logiqa(spec: BenchmarkSpec, subject: str, split: str, path: Path) -> Iterator[Question]:
    lines = path.read_text(encoding="utf-8").splitlines()
    start = None
    for lineno in range(len(lines) + 1):
        blank = lineno == len(lines) or not lines[lineno].strip()
        if not blank and start is None:
            start = lineno
        elif blank and start is not None:
            yield _logiqa_record(spec, subject, split, path, start, lines[start:lineno])
            start = None


def _logiqa_record(spec: BenchmarkSpec, subject: str, split: str, path: Path, start: int,
                   block: list[str]) -> Question:
    where = f"{path}:{start + 1}"
    if len(block) < 6:
        raise ValueError(f"{where}: a LogiQA record has an answer, a passage, a question and 4 options; "
                         f"found {len(block)} line(s)")
    ans = block[0].strip().upper()
    if ans not in "ABCD" or len(ans) != 1:
        raise ValueError(f"{where}: answer {block[0]!r} is not one of a-d")
    opts = []
    for j, (letter, line) in enumerate(zip("ABCD", block[-4:])):
        m = _LOGIQA_OPTION.match(line)
        if not m or m.group(1).upper() != letter:
            lineno = start + len(block) - 3 + j  # 1-based line of this option
            raise ValueError(f"{path}:{lineno}: expected option {letter} ('{letter}.'), got {line!r}")
        opts.append(line[m.end():])
    passage = "\n".join(block[1:-5])
    return Question(spec.name, subject, split, str(start + 1), block[-5], tuple(opts), ans, passage=passage)
