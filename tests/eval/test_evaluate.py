"""Eval stage end to end on the demo benchmarks and held-out text; accuracy tables with standard errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cptflow.eval import compare, evaluate, templates
from cptflow.eval import multiple_choice as mc_eval
from cptflow.eval.summary import summarise
from cptflow.release import delta_scheme
from cptflow.core.io import iter_jsonl, read_json
from conftest import schema_section

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "workflow/resources/demo"
BENCHMARKS = [
    {"name": "ceval", "path": str(DEMO / "benchmarks/ceval"), "layout": "ceval", "lang": "zh", "shots": 2,
     "eval_split": "val", "categories": {"logic": "humanities", "high_school_chinese": "humanities"}},
    {"name": "mmlu", "path": str(DEMO / "benchmarks/mmlu"), "layout": "mmlu", "lang": "en", "shots": 1,
     "eval_split": "test", "subjects": ["marketing", "philosophy"]},
    {"name": "c3", "path": str(DEMO / "benchmarks/c3"), "layout": "c3", "shots": 0, "eval_split": "dev"},
]
PARAMS = {"batch_size": 4, "max_length": 192, "max_questions_per_subject": 2, "max_heldout_docs": 2,
          "bpc_window_tokens": 64, "bpc_stride_tokens": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models with the demo tokenizer, and short slices of the demo held-out files."""
    root = tmp_path_factory.mktemp("eval_models")
    tok = AutoTokenizer.from_pretrained(DEMO / "tokenizer")
    for lang, src in (("zh", "zh_modern"), ("en", "en")):
        docs = [r["text"][:300] for r in iter_jsonl(DEMO / f"heldout/{src}.jsonl")][:3]
        (root / f"{lang}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    for name, seed in (("base", 0), ("adapted", 1)):
        cfg = LlamaConfig(vocab_size=32768, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    """Each model evaluated once through the CLI, as the workflow rule runs it."""
    tmp = tmp_path_factory.mktemp("eval_results")
    for name in ("base", "adapted"):
        rc = evaluate.main(["--model", str(models / name), "--name", name, "--benchmarks-json", json.dumps(BENCHMARKS),
                            "--heldout", f"zh={models / 'zh.jsonl'}", "--heldout", f"en={models / 'en.jsonl'}",
                            "--output", str(tmp / f"{name}.json"), "--predictions", str(tmp / f"{name}.jsonl"),
                            "--params", json.dumps(PARAMS), "--log", str(tmp / f"{name}.log")])
        assert rc == 0
    return tmp


def test_eval_cli_records_what_reproduces_each_number(results):
    tmp_path = results
    res = read_json(tmp_path / "base.json")
    ce = res["benchmarks"]["ceval"]
    assert ce["split"] == "val" and ce["shots"] == 2
    # The layout's official template, hashed with the published subject names the prompts used.
    names = {"computer_architecture": "计算机组成", "high_school_chinese": "高中语文", "logic": "逻辑学"}
    assert ce["template"]["name"] == "ceval" and ce["subject_names"] == names
    assert ce["template"]["sha256"] == templates.template_hash(templates.TEMPLATES["ceval"], names)
    assert ce["template"]["fields"]["header"] == "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
    assert res["benchmarks"]["mmlu"]["template"]["name"] == "mmlu"
    assert res["benchmarks"]["c3"]["template"]["name"] == "reading_zh"
    assert ce["fewshot_ids"] == {"computer_architecture": ["0", "1"], "high_school_chinese": ["0", "1"],
                                 "logic": ["0", "1"]}
    assert set(ce["scorings"]) == set(mc_eval.SCORINGS)
    assert ce["letter_token_ids"]["A"] == {"29509:A": 6}
    assert res["benchmarks"]["mmlu"]["letter_token_ids"]["A"] == {"1098:▁A": 4}
    # Per subject, per category (config map first, else C-Eval's published category), overall.
    assert set(ce["subjects"]) == {"computer_architecture", "high_school_chinese", "logic"}
    assert ce["categories"]["humanities"]["n"] == 4 and ce["categories"]["STEM"]["n"] == 2
    assert ce["overall"]["n"] == 6 and set(ce["overall"]["accuracy"]) == set(mc_eval.SCORINGS)
    assert set(res["benchmarks"]["mmlu"]["subjects"]) == {"marketing", "philosophy"}
    assert res["benchmarks"]["mmlu"]["subjects"]["marketing"]["category"] == "other"
    # Context 192 forces dropped shots; the mean number kept is recorded.
    assert 0 <= ce["shots_used_mean"]["first_token"] <= 2
    preds = list(iter_jsonl(tmp_path / "base.jsonl"))
    assert len(preds) == 12 and all(p["model"] == "base" and p["first_token"] in "ABCD" for p in preds)
    acc = sum(p["first_token"] == p["answer"] for p in preds if p["benchmark"] == "ceval") / 6
    assert ce["overall"]["accuracy"]["first_token"] == pytest.approx(acc, abs=1e-6)
    assert ce["overall"]["stderr"]["first_token"] == pytest.approx((acc * (1 - acc) / 6) ** 0.5, abs=1e-6)
    # Per-question right/wrong, in the order of the question keys, agrees with the predictions.
    ceval_preds = {f"{p['subject']}/{p['qid']}": p for p in preds if p["benchmark"] == "ceval"}
    assert sorted(ce["correct"]["questions"]) == sorted(ceval_preds)
    for key, bit in zip(ce["correct"]["questions"], ce["correct"]["option_loglik"]):
        p = ceval_preds[key]
        assert bit == ("1" if p["option_loglik"] == p["answer"] else "0")
    for h in ("zh", "en"):
        r = res["heldout"][h]
        assert r["docs"] == 2 and r["chars"] <= 600 and r["window"] == 64 and r["stride"] == 32 and r["bpc"] > 0
        assert r["tokens_per_char"] == pytest.approx(r["tokens"] / r["chars"], abs=1e-6)
        assert r["bpb"] == pytest.approx(r["bits"] / r["bytes"], rel=1e-4)
    assert res["heldout"]["zh"]["tokens_per_char"] > res["heldout"]["en"]["tokens_per_char"]
    assert res["heldout"]["zh"]["bytes"] > 2.5 * res["heldout"]["zh"]["chars"]  # mostly 3-byte characters
    man = read_json(tmp_path / "base.json.stats.json")
    assert man["stage"] == "evaluate" and man["params"]["batch_size"] == 4 and man["counts"]["questions"] == 12


def test_summarise_micro_and_macro_with_standard_errors():
    rows = [{"subject": "a", "answer": "A", "first_token": "A", "option_loglik": "B", "option_loglik_norm": "A"},
            {"subject": "a", "answer": "B", "first_token": "A", "option_loglik": "B", "option_loglik_norm": "B"},
            {"subject": "a", "answer": "C", "first_token": "C", "option_loglik": "C", "option_loglik_norm": "A"},
            {"subject": "b", "answer": "D", "first_token": "A", "option_loglik": "D", "option_loglik_norm": "D"}]
    s = summarise(rows, lambda subject: {"a": "stem"}.get(subject, "bench"))
    assert s["subjects"]["a"]["accuracy"]["first_token"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["categories"]["stem"]["n"] == 3 and s["categories"]["bench"]["n"] == 1
    assert s["overall"]["accuracy"] == {"first_token": 0.5, "option_loglik": 0.75, "option_loglik_norm": 0.75}
    assert s["overall"]["macro_accuracy"]["first_token"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-6)
    # Closed forms: sqrt(p(1-p)/n) per level; the macro mean's is sqrt(sum se^2) / subjects.
    assert s["overall"]["stderr"]["first_token"] == pytest.approx(0.25, abs=1e-6)  # sqrt(.5 * .5 / 4)
    se_a = (2 / 3 * 1 / 3 / 3) ** 0.5
    assert s["subjects"]["a"]["stderr"]["first_token"] == pytest.approx(se_a, abs=1e-6)
    assert s["subjects"]["b"]["stderr"]["first_token"] == 0.0  # 0 of 1
    assert s["overall"]["macro_stderr"]["first_token"] == pytest.approx(se_a / 2, abs=1e-6)


def test_bad_benchmark_spec_and_config_fail_with_names(models, tmp_path, capsys):
    bad = [{**BENCHMARKS[0], "layuot": "ceval"}]
    rc = evaluate.main(["--model", str(models / "base"), "--name", "b", "--benchmarks-json", json.dumps(bad),
                        "--output", str(tmp_path / "r.json")])
    assert rc == 2 and "benchmarks[0]: unknown key(s) layuot" in capsys.readouterr().err
    with pytest.raises(ValueError, match="evaluate.dtype"):
        evaluate.EvaluateConfig(dtype="fp8")


@pytest.mark.parametrize("section,cls", [("evaluate", evaluate.EvaluateConfig), ("compare", compare.CompareConfig),
                                         ("delta", delta_scheme.DeltaConfig)])
def test_schema_fragment_matches_dataclass(section, cls):
    frag = schema_section(section)
    fields = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(cls)}
    assert frag["additionalProperties"] is False
    assert {k: v["default"] for k, v in frag["properties"].items()} == fields
    assert all(v.get("description") for v in frag["properties"].values())
