"""Prompt templates: each benchmark's own published prompt format, chosen per benchmark in config.

A published score is only comparable when the prompt is the one it was measured with, so the
templates copy the benchmarks' own evaluation scripts character for character:

* ``ceval``: hkust-nlp/ceval ``code/evaluator_series/evaluators/llama.py`` — header
  "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。", ``question / A. .. / 答案：`` and the
  letter right after the colon;
* ``cmmlu``: haonan-li/CMMLU ``src/mp_utils.py`` — header "以下是关于{科目}的单项选择题，请直接给出正确答案
  的选项。", ``题目：question / A. .. / 答案是：`` and the letter right after it;
* ``mmlu``: "The following are multiple choice questions (with answers) about {subject}.", the question
  stripped, ``Answer:`` and " A" — lm-evaluation-harness's ``mmlu`` task, which is MMLU's own
  ``evaluate.py`` without its double space before the subject (``format_subject`` prefixes one);
* ``ceval_lmeval`` and ``cmmlu_lmeval``: lm-evaluation-harness's stock ``ceval-valid`` and ``cmmlu``
  tasks, which differ from the benchmarks' own scripts (C-Eval's header without "考试", CMMLU's body
  without 题目/答案是, both with the question stripped and a space before the letter). Use these to set
  cptflow's numbers beside lm-eval's, the official ones beside the benchmarks' leaderboards;
* ``reading_zh`` / ``reading_en``: passage (or dialogue) + question + options, for C3 and LogiQA
  (neither publishes a language-model prompt): ``文章：passage / 问题：question / A. .. / 答案：``;
* ``zh`` / ``en``: generic headers for AGIEval/GAOKAO-style sets;
* ``custom``: every field from the benchmark's ``prompt`` in config, for a user's own set.

Subject names in headers come from the tables the benchmarks publish (``subjects/*.json``, sources and
licences in ``subjects/SOURCES.md``): Chinese names for C-Eval and CMMLU, English ones for MMLU. The
template hash covers every field that shapes a prompt and the subject names used, so two numbers
with the same hash were measured on the same prompts.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from cptflow.core.config import ConfigError
from cptflow.eval.benchmarks import BenchmarkSpec, Question

TEMPLATE_VERSION = 2  # bump when prompt building changes; part of the template hash
LETTERS = "ABCDEFGHIJ"
SUBJECTS_DIR = Path(__file__).resolve().parent / "subjects"


@dataclass(frozen=True)
class Template:
    name: str
    header: str = ""  # before the shots; "{subject}" becomes the subject's display name
    passage: str = "{passage}\n"  # before the question, for items that have a passage or dialogue
    question: str = "{question}"
    option: str = "{letter}. {text}"  # one line per option
    cue: str = "答案："  # the line the answer follows
    sep: str = ""  # between the cue and the answer: "" after a full-width colon, " " in English
    shot_end: str = "\n\n"  # after each answered shot
    strip: bool = False  # strip the question text (lm-eval's ``question.strip()``)
    subjects: str = ""  # shipped subject table for display names and categories ("" = none)


_ZH_CUE, _EN = "答案：", {"cue": "Answer:", "sep": " "}
TEMPLATES = {t.name: t for t in (
    Template("ceval", header="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", subjects="ceval"),
    Template("ceval_lmeval", header="以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n", sep=" ",
             strip=True, subjects="ceval"),
    Template("cmmlu", header="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
             question="题目：{question}", cue="答案是：", subjects="cmmlu"),
    Template("cmmlu_lmeval", header="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", sep=" ",
             strip=True, subjects="cmmlu"),
    Template("mmlu", header="The following are multiple choice questions (with answers) about {subject}.\n\n",
             strip=True, subjects="mmlu", **_EN),
    Template("reading_zh", passage="文章：{passage}\n", question="问题：{question}"),
    Template("reading_en", passage="Passage: {passage}\n", question="Question: {question}", **_EN),
    Template("zh", header="以下是关于{subject}的单项选择题，请选出其中的正确答案。\n\n"),
    Template("en", header="The following are multiple choice questions (with answers) about {subject}.\n\n", **_EN),
)}
CUSTOM = "custom"
# The template a layout gets when the benchmark names none: its own, or the generic one of its language.
LAYOUT_TEMPLATES = {"ceval": "ceval", "cmmlu": "cmmlu", "mmlu": "mmlu", "c3": "reading_zh",
                    "logiqa": {"zh": "reading_zh", "en": "reading_en"}, "jsonl": {"zh": "zh", "en": "en"}}
_FIELDS = {"header": {"subject"}, "passage": {"passage"}, "question": {"question"}, "option": {"letter", "text"},
           "cue": set(), "sep": set(), "shot_end": set()}


def template_for(spec: BenchmarkSpec) -> Template:
    """The benchmark's template: its ``template`` key, else its layout's default; ``custom`` from ``prompt``."""
    if spec.prompt and spec.template != CUSTOM:
        raise ConfigError(f"benchmark {spec.name}: 'prompt' is only read with template: custom")
    if spec.template == CUSTOM:
        unknown = sorted(set(spec.prompt) - set(_FIELDS) - {"strip"})
        if unknown:
            raise ConfigError(f"benchmark {spec.name}: prompt has unknown key(s) {', '.join(unknown)}; "
                              f"known: {', '.join([*_FIELDS, 'strip'])}")
        t = replace(Template(CUSTOM), **spec.prompt)
    elif spec.template:
        if spec.template not in TEMPLATES:
            raise ConfigError(f"benchmark {spec.name}: template {spec.template!r} is not one of "
                              f"{', '.join([*TEMPLATES, CUSTOM])}")
        t = TEMPLATES[spec.template]
    else:
        default = LAYOUT_TEMPLATES[spec.layout]
        t = TEMPLATES[default if isinstance(default, str) else default["zh" if spec.lang.startswith("zh") else "en"]]
    for key, allowed in _FIELDS.items():
        used = {f for _, f, _, _ in string.Formatter().parse(getattr(t, key)) if f is not None}
        if used - allowed:
            raise ConfigError(f"benchmark {spec.name}: template {t.name} field {key!r} uses "
                              f"{{{', '.join(sorted(used - allowed))}}}; it may use {sorted(allowed) or 'no fields'}")
    return t


@lru_cache(maxsize=None)
def subject_table(name: str) -> dict[str, dict[str, Any]]:
    """A shipped subject table: subject (file stem) -> {"name", "category", ...}."""
    if not name:
        return {}
    return json.loads((SUBJECTS_DIR / f"{name}.json").read_text(encoding="utf-8"))["subjects"]


def display_name(spec: BenchmarkSpec, t: Template, subject: str) -> str:
    """The subject as the prompt names it: config override, the benchmark's published name, else 'a_b' -> 'a b'."""
    if subject in spec.subject_names:
        return spec.subject_names[subject]
    entry = subject_table(t.subjects).get(subject)
    return entry["name"] if entry else subject.replace("_", " ")


def category_of(spec: BenchmarkSpec, t: Template, subject: str) -> str:
    """Config override, the benchmark's published category, else the benchmark's name."""
    if subject in spec.categories:
        return spec.categories[subject]
    entry = subject_table(t.subjects).get(subject)
    return entry["category"] if entry and entry.get("category") else spec.name


def template_hash(t: Template, names: dict[str, str] | None = None) -> str:
    """Short sha256 of everything that shapes a prompt (and the subject names used), recorded beside every number."""
    shaping = {k: v for k, v in asdict(t).items() if k not in ("name", "subjects")}
    blob = json.dumps({**shaping, "version": TEMPLATE_VERSION, "names": dict(sorted((names or {}).items()))},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe(t: Template) -> dict[str, Any]:
    """The template as recorded in results (every field, so a reader can rebuild the prompts)."""
    return {f.name: getattr(t, f.name) for f in fields(t)}


def answer_text(q: Question, style: str) -> str:
    assert q.answer is not None
    return q.answer if style == "letter" else q.options[LETTERS.index(q.answer)]


def question_block(t: Template, q: Question, answer: str | None) -> str:
    """One question as the template lays it out; with ``answer`` it is a solved shot."""
    text = q.question.strip() if t.strip else q.question
    lines = [t.question.format(question=text), *(t.option.format(letter=L, text=o) for L, o in zip(LETTERS, q.options)),
             t.cue]
    block = (t.passage.format(passage=q.passage) if q.passage else "") + "\n".join(lines)
    return block if answer is None else block + t.sep + answer + t.shot_end


def build_prompt(t: Template, subject: str, shots: Sequence[Question], q: Question, style: str) -> str:
    """Header (with the subject's display name), the solved shots, then the question up to the cue."""
    return (t.header.format(subject=subject) + "".join(question_block(t, s, answer_text(s, style)) for s in shots)
            + question_block(t, q, None))
