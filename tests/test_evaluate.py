"""Eval stage end to end on the demo benchmarks and held-out text; accuracy tables; compare."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cptflow import delta, evaluate, mc_eval
from cptflow.io import iter_jsonl, read_json
from conftest import schema_section

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "workflow/resources/demo"
BENCHMARKS = [
    {"name": "ceval", "path": str(DEMO / "benchmarks/ceval"), "layout": "ceval", "lang": "zh", "shots": 2,
     "eval_split": "val", "categories": {"logic": "humanities", "high_school_chinese": "humanities"}},
    {"name": "mmlu", "path": str(DEMO / "benchmarks/mmlu"), "layout": "mmlu", "lang": "en", "shots": 1,
     "eval_split": "test", "subjects": ["marketing", "philosophy"]},
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
    assert ce["template"]["sha256"] == mc_eval.template_hash(mc_eval.TEMPLATES["zh"])
    assert res["benchmarks"]["mmlu"]["template"]["name"] == "en"
    assert ce["fewshot_ids"] == {"computer_architecture": ["0", "1"], "high_school_chinese": ["0", "1"],
                                 "logic": ["0", "1"]}
    assert set(ce["scorings"]) == set(mc_eval.SCORINGS)
    assert ce["letter_token_ids"]["A"] == {"29509:A": 6}
    assert res["benchmarks"]["mmlu"]["letter_token_ids"]["A"] == {"1098:▁A": 4}
    # Per subject, per category (map from config, default = benchmark name), overall.
    assert set(ce["subjects"]) == {"computer_architecture", "high_school_chinese", "logic"}
    assert ce["categories"]["humanities"]["n"] == 4 and ce["categories"]["ceval"]["n"] == 2
    assert ce["overall"]["n"] == 6 and set(ce["overall"]["accuracy"]) == set(mc_eval.SCORINGS)
    assert set(res["benchmarks"]["mmlu"]["subjects"]) == {"marketing", "philosophy"}
    # Context 192 forces dropped shots; the mean number kept is recorded.
    assert 0 <= ce["shots_used_mean"]["first_token"] <= 2
    preds = list(iter_jsonl(tmp_path / "base.jsonl"))
    assert len(preds) == 10 and all(p["model"] == "base" and p["first_token"] in "ABCD" for p in preds)
    acc = sum(p["first_token"] == p["answer"] for p in preds if p["benchmark"] == "ceval") / 6
    assert ce["overall"]["accuracy"]["first_token"] == pytest.approx(acc, abs=1e-6)
    for h in ("zh", "en"):
        r = res["heldout"][h]
        assert r["docs"] == 2 and r["chars"] <= 600 and r["window"] == 64 and r["stride"] == 32 and r["bpc"] > 0
        assert r["tokens_per_char"] == pytest.approx(r["tokens"] / r["chars"], abs=1e-6)
    assert res["heldout"]["zh"]["tokens_per_char"] > res["heldout"]["en"]["tokens_per_char"]
    man = read_json(tmp_path / "base.json.stats.json")
    assert man["stage"] == "eval" and man["params"]["batch_size"] == 4 and man["counts"]["questions"] == 10


def test_compare_puts_models_side_by_side(results, tmp_path):
    rc = evaluate.main(["compare", "--results", str(results / "base.json"), str(results / "adapted.json"),
                        "--output-json", str(tmp_path / "table.json"), "--output-md", str(tmp_path / "table.md")])
    assert rc == 0
    table = read_json(tmp_path / "table.json")
    assert table["models"] == ["base", "adapted"]
    overall = next(r for r in table["accuracy"] if r["benchmark"] == "ceval" and r["level"] == "overall")
    base, adapted = (read_json(results / f"{n}.json")["benchmarks"]["ceval"]["overall"]["accuracy"]
                     for n in ("base", "adapted"))
    assert overall["models"]["base"]["first_token"] == base["first_token"]
    assert overall["models"]["adapted"]["option_loglik"] == adapted["option_loglik"]
    md = (tmp_path / "table.md").read_text(encoding="utf-8")
    assert "| benchmark | group | n | base first token | adapted first token |" in md
    d = 100 * (adapted["first_token"] - base["first_token"])
    assert f"| ceval | **overall** | 6 |" in md and f"{d:+.1f}" in md
    assert "| zh |" in md and "| en |" in md and "· logic" in md


def test_summarise_micro_and_macro():
    rows = [{"subject": "a", "answer": "A", "first_token": "A", "option_loglik": "B", "option_loglik_norm": "A"},
            {"subject": "a", "answer": "B", "first_token": "A", "option_loglik": "B", "option_loglik_norm": "B"},
            {"subject": "a", "answer": "C", "first_token": "C", "option_loglik": "C", "option_loglik_norm": "A"},
            {"subject": "b", "answer": "D", "first_token": "A", "option_loglik": "D", "option_loglik_norm": "D"}]
    s = evaluate.summarise(rows, {"a": "stem"}, "bench")
    assert s["subjects"]["a"]["accuracy"]["first_token"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["categories"]["stem"]["n"] == 3 and s["categories"]["bench"]["n"] == 1
    assert s["overall"]["accuracy"] == {"first_token": 0.5, "option_loglik": 0.75, "option_loglik_norm": 0.75}
    assert s["overall"]["macro_accuracy"]["first_token"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-6)


def test_bad_benchmark_spec_and_config_fail_with_names(models, tmp_path, capsys):
    bad = [{**BENCHMARKS[0], "layuot": "ceval"}]
    rc = evaluate.main(["--model", str(models / "base"), "--name", "b", "--benchmarks-json", json.dumps(bad),
                        "--output", str(tmp_path / "r.json")])
    assert rc == 2 and "benchmarks[0]: unknown key(s) layuot" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval.dtype"):
        evaluate.EvalConfig(dtype="fp8")


@pytest.mark.parametrize("section,cls", [("eval", evaluate.EvalConfig), ("delta", delta.DeltaConfig)])
def test_schema_fragment_matches_dataclass(section, cls):
    frag = schema_section(section)
    fields = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(cls)}
    assert frag["additionalProperties"] is False
    assert {k: v["default"] for k, v in frag["properties"].items()} == fields
    assert all(v.get("description") for v in frag["properties"].values())
