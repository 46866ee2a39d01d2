"""Prompt templates against the benchmarks' own published prompt formats, character for character.

Each reference below is an independent transcription of the published prompt builder (cited), not a
call into cptflow; cptflow's prompts for the demo questions must equal them exactly.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cptflow.core.config import ConfigError
from cptflow.eval import templates
from cptflow.eval.benchmarks import BenchmarkSpec, Question, read_questions

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "workflow/resources/demo/benchmarks"
EVAL_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}


def demo(name: str, template: str = "") -> tuple[BenchmarkSpec, dict[str, list[Question]], list[Question]]:
    spec = BenchmarkSpec(name, str(DEMO / name), name, template=template)
    dev: dict[str, list[Question]] = {}
    for q in read_questions(spec, "dev"):
        dev.setdefault(q.subject, []).append(q)
    return spec, dev, list(read_questions(spec, EVAL_SPLIT[name]))


def prompts(name: str, template: str = "", shots: int = 5) -> list[tuple[Question, list[Question], str]]:
    spec, dev, qs = demo(name, template)
    t = templates.template_for(spec)
    return [(q, dev[q.subject][:shots], templates.build_prompt(t, templates.display_name(spec, t, q.subject),
                                                              dev[q.subject][:shots], q, "letter"))
            for q in qs[:: max(1, len(qs) // 12)]]


def opts(q: Question) -> str:
    return "".join(f"\n{c}. {o}" for c, o in zip("ABCD", q.options))


# hkust-nlp/ceval code/evaluator_series/evaluators/llama.py: generate_few_shot_prompt + format_example
def ceval_official(subject_zh: str, dev: list[Question], q: Question) -> str:
    prompt = f"以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\n\n"
    for s in dev:
        prompt += s.question + opts(s) + "\n答案：" + s.answer + "\n\n"
    return prompt + q.question + opts(q) + "\n答案："


# haonan-li/CMMLU src/mp_utils.py: gen_prompt + format_example
def cmmlu_official(subject_zh: str, dev: list[Question], q: Question) -> str:
    prompt = "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n".format(subject_zh)
    for s in dev:
        prompt += "题目：" + s.question + opts(s) + "\n答案是：" + "{}\n\n".format(s.answer)
    return prompt + "题目：" + q.question + opts(q) + "\n答案是："


# hendrycks/test evaluate.py: gen_prompt + format_example (format_subject puts a space before each word)
def mmlu_hendrycks(subject: str, dev: list[Question], q: Question) -> str:
    prompt = "The following are multiple choice questions (with answers) about {}.\n\n".format(
        "".join(" " + w for w in subject.split("_")))
    for s in dev:
        prompt += s.question + opts(s) + "\nAnswer:" + " {}\n\n".format(s.answer)
    return prompt + q.question + opts(q) + "\nAnswer:"


# lm-evaluation-harness 0.4.13 stock tasks: description + (doc_to_text + target_delimiter " " + choice
# + fewshot_delimiter "\n\n") per shot + doc_to_text; doc_to_text = "{{question.strip()}}\nA. {{A}}...\n<cue>"
def lmeval(description: str, cue: str, dev: list[Question], q: Question) -> str:
    def doc_to_text(d: Question) -> str:
        return d.question.strip() + opts(d) + "\n" + cue
    return description + "".join(doc_to_text(s) + " " + s.answer + "\n\n" for s in dev) + doc_to_text(q)


def test_ceval_official_prompt():
    spec, dev, qs = demo("ceval")
    for q, shots, prompt in prompts("ceval"):
        assert prompt == ceval_official(templates.subject_table("ceval")[q.subject]["name"], shots, q)
    assert prompts("ceval")[0][2].startswith("以下是中国关于计算机组成考试的单项选择题，请选出其中的正确答案。\n\n")
    logic = next(p for q, _, p in prompts("ceval") if q.subject == "logic")
    assert logic.startswith("以下是中国关于逻辑学考试的单项选择题，请选出其中的正确答案。\n\n")


def test_cmmlu_official_prompt():
    for q, shots, prompt in prompts("cmmlu"):
        assert prompt == cmmlu_official(templates.subject_table("cmmlu")[q.subject]["name"], shots, q)
    first = prompts("cmmlu")[0][2]
    assert first.startswith("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n题目：")
    assert first.endswith("\n答案是：")


def test_mmlu_prompt_is_hendrycks_up_to_its_double_space_and_strip():
    """lm-eval's mmlu (cptflow's mmlu) = hendrycks/test's evaluate.py with one space before the subject and each
    question stripped (some MMLU questions start with a space: ' _____________ is a natural outcome ...')."""
    def stripped(q: Question) -> Question:
        return replace(q, question=q.question.strip())

    spaced = 0
    for q, shots, prompt in prompts("mmlu"):
        spaced += sum(x.question != x.question.strip() for x in (q, *shots))
        ref = mmlu_hendrycks(q.subject, [stripped(s) for s in shots], stripped(q))
        assert ref.count("about  ") == 1
        assert prompt == ref.replace("about  ", "about ", 1)
        desc = f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
        assert prompt == lmeval(desc, "Answer:", shots, q)
    assert spaced  # the demo has such questions, so the strip is exercised


@pytest.mark.parametrize("name,template,description", [
    ("ceval", "ceval_lmeval", "以下是中国关于{}的单项选择题，请选出其中的正确答案。\n\n"),
    ("cmmlu", "cmmlu_lmeval", "以下是关于{}的单项选择题，请直接给出正确答案的选项。\n\n"),
])
def test_lmeval_stock_prompts(name, template, description):
    """ceval-valid / cmmlu as lm-eval's stock task files build them (descriptions from their _generate_configs.py)."""
    for q, shots, prompt in prompts(name, template):
        subject = templates.subject_table(name)[q.subject]["name"]
        assert prompt == lmeval(description.format(subject), "答案：", shots, q)


def test_lmeval_templates_strip_the_question_as_lmeval_does():
    q = Question("ceval", "logic", "val", "0", "  为什么？\n", ("甲", "乙", "丙", "丁"), "A")
    t = templates.TEMPLATES["ceval_lmeval"]
    assert templates.question_block(t, q, None) == "为什么？\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案："
    assert templates.question_block(templates.TEMPLATES["ceval"], q, "A") == "  为什么？\n\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案：A\n\n"


def test_reading_template_lays_out_passage_question_and_variable_options():
    spec = BenchmarkSpec("c3", str(DEMO / "c3"), "c3", eval_split="dev")
    qs = list(read_questions(spec, "dev"))
    two = next(q for q in qs if len(q.options) == 2)
    t = templates.template_for(spec)
    assert t.name == "reading_zh"
    text = templates.build_prompt(t, "m", [], two, "letter")
    assert text == f"文章：{two.passage}\n问题：{two.question}\nA. {two.options[0]}\nB. {two.options[1]}\n答案："


def test_subject_tables_cover_the_benchmarks():
    sizes = {name: len(templates.subject_table(name)) for name in ("ceval", "cmmlu", "mmlu")}
    assert sizes == {"ceval": 52, "cmmlu": 67, "mmlu": 57}
    assert templates.subject_table("ceval")["computer_architecture"] == {
        "name": "计算机组成", "name_en": "Computer Architecture", "category": "STEM"}
    assert templates.subject_table("cmmlu")["logical"]["name"] == "逻辑学"
    assert templates.subject_table("mmlu")["us_foreign_policy"] == {"name": "us foreign policy",
                                                                    "category": "social sciences"}
    for name in ("ceval", "cmmlu", "mmlu"):  # every demo subject has its published name and category
        spec, _, qs = demo(name)
        for s in {q.subject for q in qs}:
            entry = templates.subject_table(name)[s]
            assert entry["name"] and entry["category"]
        meta = json.loads((templates.SUBJECTS_DIR / f"{name}.json").read_text(encoding="utf-8"))
        assert meta["source"] and meta["licence"]


def test_config_overrides_and_template_choice():
    spec = BenchmarkSpec("ceval", str(DEMO / "ceval"), "ceval", subject_names={"logic": "逻辑"}, categories={"logic": "x"})
    t = templates.template_for(spec)
    assert templates.display_name(spec, t, "logic") == "逻辑"
    assert templates.display_name(spec, t, "computer_architecture") == "计算机组成"
    assert templates.display_name(spec, t, "not_published") == "not published"
    assert templates.category_of(spec, t, "logic") == "x" and templates.category_of(spec, t, "not_published") == "ceval"
    jsonl = BenchmarkSpec("agi", "x", "jsonl", lang="en")
    assert templates.template_for(jsonl).name == "en"
    assert templates.template_for(replace(jsonl, template="cmmlu")).name == "cmmlu"


def test_custom_template_and_its_errors():
    spec = BenchmarkSpec("mine", "x", "jsonl", template="custom",
                         prompt={"header": "关于{subject}：\n", "question": "问：{question}", "cue": "答：", "strip": True})
    t = templates.template_for(spec)
    q = Question("mine", "s", "test", "1", " 一加一？", ("二", "三"), "A")
    assert templates.build_prompt(t, "算术", [], q, "letter") == "关于算术：\n问：一加一？\nA. 二\nB. 三\n答："
    bad = [(replace(spec, prompt={"heder": "x"}), "unknown key"),
           (replace(spec, prompt={"question": "{passage}"}), r"field 'question' uses \{passage\}"),
           (replace(spec, template="ceval"), "only read with template: custom"),
           (replace(spec, template="nope", prompt={}), "template 'nope' is not one of")]
    for s, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            templates.template_for(s)


def test_template_hash_is_stable_and_sensitive():
    t = templates.TEMPLATES["cmmlu"]
    names = {"agronomy": "农学"}
    h = templates.template_hash(t, names)
    assert h == templates.template_hash(templates.Template(**t.__dict__), dict(names))
    assert h != templates.template_hash(replace(t, sep=" "), names)
    assert h != templates.template_hash(t, {"agronomy": "agronomy"})
    assert templates.template_hash(templates.TEMPLATES["ceval"]) != templates.template_hash(templates.TEMPLATES["ceval_lmeval"])
