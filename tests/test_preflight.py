"""Start-of-run checks (cptflow.preflight): everything a config names, each problem with its key."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from cptflow.core.schema import validate_with_defaults
from cptflow.preflight import check_config, notes


@pytest.fixture()
def demo() -> dict:
    return validate_with_defaults(yaml.safe_load((REPO / "config" / "demo.yaml").read_text(encoding="utf-8")))


CATS = ["en_replay", "zh_books", "zh_web"]


def test_shipped_configs_have_no_problems(demo):
    assert check_config(demo, CATS, str(REPO)) == []
    tiny = validate_with_defaults(yaml.safe_load((REPO / "tests/configs/tiny.yaml").read_text(encoding="utf-8")))
    assert check_config(tiny, CATS, str(REPO)) == []


def test_late_checks_now_happen_at_start_naming_the_key(demo, tmp_path):
    """Issue 14: a missing benchmark path or an unknown decontaminate.benchmarks name failed only
    after the dedup jobs ran; bands x rows != num_perm was a bare ValueError at DAG build."""
    cfg = copy.deepcopy(demo)
    cfg["benchmarks"][1]["path"] = "nowhere/cmmlu"
    cfg["benchmarks"][2]["eval_split"] = "valid"
    cfg["decontaminate"]["benchmarks"] = ["ceval", "agieval"]
    cfg["dedup"]["bands"] = 16
    cfg["heldout"]["en"] = "nowhere/en.jsonl"
    cfg["vocab"]["categories"] = ["zh_wiki"]
    cfg["pack"]["replay"]["category"] = "english"
    cfg["train"]["deepspeed"] = "config/deepspeed/zero9.json"
    cfg["clean"]["min_chars"] = 500_000
    problems = check_config(cfg, CATS, str(REPO))
    keys = [p.split(":")[0].split(" ")[0] for p in problems]
    assert keys == ["clean", "dedup", "benchmarks[1]", "benchmarks[2]", "decontaminate.benchmarks", "heldout.en",
                    "train.deepspeed", "vocab.categories", "pack.replay.category"], problems
    text = "\n".join(problems)
    assert "bands * rows must equal num_perm (16 * 6 != 120)" in text
    assert "benchmarks[1] (cmmlu).path: benchmark folder 'nowhere/cmmlu' does not exist" in text
    assert "benchmarks[2] (mmlu).eval_split: no split 'valid'" in text and "mmlu" in text
    assert "unknown benchmark name(s) ['agieval']" in text
    assert "unknown category ['zh_wiki']; the sources give ['en_replay', 'zh_books', 'zh_web']" in text


def test_a_pinned_tokenizer_must_be_a_tokenizer_folder(demo, tmp_path):
    cfg = copy.deepcopy(demo)
    cfg["vocab"]["tokenizer"] = "nowhere/tokenizer"
    assert [p.split(":")[0] for p in check_config(cfg, CATS, str(REPO))] == ["vocab.tokenizer"]
    cfg["vocab"]["tokenizer"] = str(tmp_path)  # exists, but holds no tokenizer.json
    assert "has no tokenizer.json" in " ".join(check_config(cfg, CATS, str(REPO)))
    (tmp_path / "tokenizer.json").write_text("{}")
    assert check_config(cfg, CATS, str(REPO)) == []


def test_dev_split_is_needed_only_with_shots(demo, tmp_path):
    bench = tmp_path / "b"
    (bench / "test").mkdir(parents=True)
    cfg = copy.deepcopy(demo)
    cfg["benchmarks"] = [{"name": "b", "path": str(bench), "layout": "mmlu", "lang": "en", "eval_split": "test",
                          "dev_split": "dev", "shots": 5, "subjects": [], "categories": {}}]
    cfg["decontaminate"]["benchmarks"] = []
    assert [p.split(":")[0] for p in check_config(cfg, CATS, str(REPO))] == ["benchmarks[0] (b).dev_split"]
    cfg["benchmarks"][0]["shots"] = 0
    assert check_config(cfg, CATS, str(REPO)) == []


def test_empty_benchmarks_and_heldout_are_said_at_start(demo):
    cfg = copy.deepcopy(demo) | {"benchmarks": [], "heldout": {"zh": None, "en": None}}
    cfg["decontaminate"]["benchmarks"] = []
    assert check_config(cfg, CATS, str(REPO)) == []
    said = notes(cfg)
    assert len(said) == 2 and "decontamination removes nothing" in said[0] and "bits per character" in said[1]
    assert notes(demo) == []


def test_the_sft_branch_is_checked_at_start_naming_the_key(demo):
    """Conversation globs, the template file, the DeepSpeed json, start_from and the finetune rules, all at once."""
    cfg = copy.deepcopy(demo)
    sft = cfg["sft"]
    sft["sources"].append({"name": "mine", "paths": ["nowhere/*.jsonl"], "format": "auto"})
    sft["sft_pack"]["chat_template"] = "templates/chatml.jinja"
    sft["finetune"].update(deepspeed="config/deepspeed/zero9.json", engine="deepspeed", method="qlora")
    sft["start_from"] = "replay"
    problems = check_config(cfg, CATS, str(REPO))
    assert [p.split(":")[0] for p in problems] == ["sft.finetune", "sft.sources[1] (mine)", "sft.sft_pack.chat_template",
                                                   "sft.finetune.deepspeed", "sft.start_from"], problems
    text = "\n".join(problems)
    assert "method qlora trains on one 4-bit copy per process" in text
    assert "path pattern 'nowhere/*.jsonl' matches no file" in text
    assert "'replay' is not a train stage; the stages are ['embed_align', 'full']" in text
