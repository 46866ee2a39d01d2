"""What a benchmark is (a config entry) and what reading it yields (questions): the types every layout shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LETTERS = ("A", "B", "C", "D")  # the CSV layouts have exactly four options
JSONL_LETTERS = "ABCDEFGHIJ"  # other layouts have 2 to 10 (C3: 2-4, AGIEval: 4-5)
LAYOUTS = ("ceval", "cmmlu", "mmlu", "jsonl", "c3", "logiqa")


@dataclass(frozen=True)
class Question:
    benchmark: str
    subject: str
    split: str
    qid: str
    question: str
    options: tuple[str, ...]
    answer: str | None  # a letter, or None where labels are unpublished
    passage: str = ""  # reading comprehension: the passage or dialogue the question is about

    def text(self) -> str:
        """Passage, question and options as one string (what decontamination matches against)."""
        return "\n".join([self.passage + self.question, *self.options])


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
    categories: dict[str, str] = field(default_factory=dict)  # subject -> category (default: the published one)
    template: str = ""  # prompt template (cptflow.eval.templates); "" = the layout's own
    prompt: dict[str, Any] = field(default_factory=dict)  # the fields of template: custom
    subject_names: dict[str, str] = field(default_factory=dict)  # subject -> name in prompts (default: published)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"benchmark {self.name}: layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
