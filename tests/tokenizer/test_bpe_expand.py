"""Byte-level BPE expansion (vocab.method continued_bpe) on SmolLM2-135M's real tokenizer.

One expansion trained on ~200k characters of the shipped demo corpus (seconds), checked for what
the workflow relies on: base ids and merges never move, English and code keep their exact ids, every
new token is reachable, the folder loads and saves with transformers, held-out Chinese gets shorter.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from conftest import DEMO, REPO, read_texts

from cptflow.core.io import read_json, sha256_path
from cptflow.tokenizer.bpe_expand import count_words, expanded_json, learn, load_base, take_chars
from cptflow.tokenizer.bpe_merges import implies_cjk, token_bytes
from cptflow.tokenizer.bpe_verify import (
    check_structure,
    unreachable,
    verify_expansion,
    whole_text,
)
from cptflow.tokenizer.sp_merge import PROBES, has_cjk
from cptflow.tokenizer.vocab import main, run
from cptflow.tokenizer.vocab_config import VocabConfig

SMOL = REPO / "workflow" / "resources" / "smollm2" / "tokenizer"
HELD_ZH, HELD_EN = DEMO / "heldout" / "zh_modern.jsonl", DEMO / "heldout" / "en.jsonl"
TRAIN = [DEMO / "corpus" / "zh_web" / "cmrc2018_trial.jsonl", DEMO / "corpus" / "zh_web" / "cmrc2019_trial.jsonl"]
CFG = VocabConfig(method="continued_bpe", max_new_tokens=3000)
CODE = [t for t in (p.read_text(encoding="utf-8") for p in sorted((REPO / "src").rglob("*.py"))) if not has_cjk(t)]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("bpe")
    stats = run(CFG, SMOL, TRAIN, HELD_ZH, HELD_EN, d / "tok", d / "s.json", d / "c.json", d / "c.md")
    return {"dir": d, "stats": stats, "base": AutoTokenizer.from_pretrained(str(SMOL)),
            "new": AutoTokenizer.from_pretrained(str(d / "tok")),
            "base_json": read_json(SMOL / "tokenizer.json"), "new_json": read_json(d / "tok" / "tokenizer.json")}


def ids(tok, texts):
    return tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_base_ids_and_merges_never_move(out):
    base, new = out["base_json"], out["new_json"]
    bv, nv = base["model"]["vocab"], new["model"]["vocab"]
    assert all(nv[t] == i for t, i in bv.items())
    assert sorted(i for t, i in nv.items() if t not in bv) == list(range(49152, 52152))
    assert len(base["model"]["merges"]) == 48900 and new["model"]["merges"][:48900] == base["model"]["merges"]
    assert len(new["model"]["merges"]) == 48900 + 3000
    # SmolLM2's specials sit at ids 0-16, inside the vocabulary: they stay there, still special.
    assert new["added_tokens"] == base["added_tokens"] and [t["id"] for t in new["added_tokens"]] == list(range(17))
    assert {k: v for k, v in new.items() if k != "model"} == {k: v for k, v in base.items() if k != "model"}
    b, n = out["base"], out["new"]
    assert len(n) == 52152 and n.convert_ids_to_tokens(list(range(49152))) == b.convert_ids_to_tokens(list(range(49152)))
    assert (n.bos_token_id, n.eos_token_id, n.pad_token_id, n.unk_token_id) == (1, 2, 2, 0)
    manifest = read_json(out["dir"] / "s.json")
    assert manifest["vocab"]["first_new_id"] == 49152 and manifest["vocab"]["vocab_size"] == 52152


def test_english_and_code_encode_to_the_base_ids(out):
    texts = read_texts(HELD_EN) + CODE + [p for p in PROBES if not has_cjk(p)]
    assert len(CODE) >= 20 and sum(map(len, CODE)) > 100_000
    assert ids(out["new"], texts) == ids(out["base"], texts)
    mixed = "def f():\n    return '<|im_end|>'  # 注释: 中文 and English\n"  # specials in text stay text
    got, want = ids(out["new"], [mixed])[0], ids(out["base"], [mixed])[0]
    assert len(got) < len(want) and out["new"].decode(got) == mixed


def test_every_new_token_is_reachable(out):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(out["dir"] / "tok" / "tokenizer.json"))
    new = [(i, t) for t, i in out["new_json"]["model"]["vocab"].items() if i >= 49152]
    assert all([x.id for x in raw.model.tokenize(t)] == [i] for i, t in new)  # its bytes alone give it alone
    whole = [(i, s) for i, t in new if (s := whole_text(t)) is not None]
    assert len(whole) > 2500 and ids(out["new"], [s for _, s in whole]) == [[i] for i, _ in whole]
    assert all(implies_cjk(token_bytes(t)) for _, t in new)  # and none can appear in CJK-free text
    assert not unreachable(raw, out["new"], out["new_json"], 49152)
    audit = read_json(out["dir"] / "c.json")["audit"]
    assert audit["reachable"] == audit["new_tokens"] == 3000
    assert audit["fragment_tokens"] == 3000 - len(whole) > 0  # e.g. 2 of a character's 3 bytes


def test_save_and_load_round_trip(out, tmp_path):
    from transformers import AutoTokenizer

    assert sorted(p.name for p in (out["dir"] / "tok").iterdir()) == [
        "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    assert read_json(out["dir"] / "tok" / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    out["new"].save_pretrained(str(tmp_path / "again"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "again"))
    texts = read_texts(HELD_ZH) + read_texts(HELD_EN) + CODE[:5] + list(PROBES)
    assert again.get_vocab() == out["new"].get_vocab()
    assert ids(again, texts) == ids(out["new"], texts)
    assert [again.decode(x) for x in ids(again, texts)] == texts
    assert again.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False) == \
        out["base"].apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)


def test_heldout_chinese_uses_the_new_tokens_and_gets_shorter(out):
    rep = read_json(out["dir"] / "c.json")
    base, new = rep["tokenizers"]["base"]["zh"]["tokens_per_char"], rep["tokenizers"]["expanded"]["zh"]["tokens_per_char"]
    assert base > 1.7 and new < 0.6 * base  # measured: 1.782 -> 0.920 with 3000 tokens from 200k characters
    assert rep["tokenizers"]["expanded"]["en"]["tokens"] == rep["tokenizers"]["base"]["en"]["tokens"]
    used = rep["audit"]["heldout"]["zh"]
    assert used["new_tokens_used"] > 2000 and used["new_token_occurrences"] > used["tokens"] / 2
    assert rep["audit"]["heldout"]["en"]["new_tokens_used"] == 0
    md = (out["dir"] / "c.md").read_text(encoding="utf-8")
    assert "New tokens: 3000, 3000 reachable" in md and "| expanded | 52152 |" in md
    manifest = read_json(out["dir"] / "s.json")
    assert manifest["vocab"]["audit"] == rep["audit"] and manifest["vocab"]["method"] == "continued_bpe"
    assert manifest["counts"]["words_distinct"] > 1000 and manifest["counts"]["chars_learned"] > 150_000


def test_expansion_only_merges_base_tokens_further(out):
    """New merges rank after every base merge, so an expanded token always covers whole base tokens."""
    def cuts(tok, text):
        ends, pos = set(), 0
        for t in tok.convert_ids_to_tokens(ids(tok, [text])[0]):
            pos += len(token_bytes(t))
            ends.add(pos)
        return ends

    zh = read_texts(HELD_ZH)
    assert all(cuts(out["new"], t) <= cuts(out["base"], t) for t in zh)


def test_same_inputs_give_byte_identical_outputs(out, tmp_path):
    again = run(CFG, SMOL, TRAIN, HELD_ZH, HELD_EN, tmp_path / "tok", None, tmp_path / "c.json")
    assert sha256_path(tmp_path / "tok") == sha256_path(out["dir"] / "tok")
    assert (tmp_path / "c.json").read_bytes() == (out["dir"] / "c.json").read_bytes()
    assert again.to_dict() == out["stats"].to_dict()


def test_verify_rejects_broken_expansions(out, tmp_path):
    from tokenizers import Tokenizer

    base_json, good = out["base_json"], out["new_json"]
    texts, same = read_texts(HELD_ZH, 5), read_texts(HELD_EN, 5)

    def broken(change):
        data = copy.deepcopy(good)
        change(data)
        return data

    first = good["model"]["merges"][48900]
    cases = {
        "base token": lambda d: d["model"]["vocab"].update({"Ġthe": 52152}),
        "base merge 7 changed": lambda d: d["model"]["merges"].__setitem__(7, first),
        "pre_tokenizer": lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
        "merges appended for": lambda d: d["model"]["merges"].pop(),
    }
    for msg, change in cases.items():
        with pytest.raises(ValueError, match=msg):
            check_structure(base_json, broken(change), 49152)
    # An English merge appended the same way changes English ids: the same-ids check sees it.
    eng = broken(lambda d: (d["model"]["vocab"].update({"Ġthecat": 52152}), d["model"]["merges"].append(["Ġthe", "cat"])))
    assert "Ġthecat" not in good["model"]["vocab"]
    from transformers import AutoTokenizer

    d = shutil.copytree(out["dir"] / "tok", tmp_path / "eng")
    raw = Tokenizer.from_str(json.dumps(eng))
    raw.save(str(d / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(d))
    with pytest.raises(ValueError, match="encodes differently"):
        verify_expansion(out["base"], auto, raw, base_json, eng, 49152, texts, same + ["the thecat sat"],
                         require_cjk=False)


def test_a_base_with_specials_after_its_vocabulary_keeps_them_there(tmp_path):
    """LLaMA-3 style: 256 reserved specials follow the BPE vocabulary (ids 128000-128255) and are not in
    it. New tokens must start after them, never over them."""
    data = json.loads((SMOL / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] += [{"id": 49152 + k, "content": f"<|reserved_{k}|>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for k in range(8)]
    d = tmp_path / "llama3ish"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    base = load_base(d)
    assert base.first_id == 49160
    cfg = VocabConfig(method="continued_bpe", max_new_tokens=50)
    learned = learn(base, count_words(base, read_texts(TRAIN[1], 30), True), cfg)
    new = expanded_json(base, learned)
    assert check_structure(base.data, new, 49160) == 50
    assert min(i for t, i in new["model"]["vocab"].items() if t not in data["model"]["vocab"]) == 49160
    assert new["added_tokens"] == data["added_tokens"]


def test_methods_that_do_not_apply_fail_naming_the_file_and_what_applies(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"tokenizer.json: vocab.method 'both' cannot handle a byte_bpe .*"
                                         r"methods that apply: continued_bpe, none"):
        run(VocabConfig(), SMOL, TRAIN, HELD_ZH, None, tmp_path / "a")
    rc = main(["--base-tokenizer", str(DEMO / "tokenizer"), "--train-text", str(TRAIN[0]),
               "--output-dir", str(tmp_path / "b"), "--params", '{"method": "continued_bpe"}'])
    err = capsys.readouterr().err
    assert rc == 2 and "tokenizer.model: vocab.method 'continued_bpe' cannot handle a sentencepiece" in err
    assert "methods that apply: sentencepiece, top_chars, both, none" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_training_text_is_cut_to_max_train_chars_and_must_not_be_empty(tmp_path):
    lines = ["一二三", "四五", "六七八九", "十"]
    assert take_chars(lines, 5) == lines[:2] and take_chars(lines, 0) == lines and take_chars(lines, 100) == lines
    english = tmp_path / "en.jsonl"
    english.write_text('{"text": "only English here"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no training lines in .*en.jsonl .*with a CJK character"):
        run(CFG, SMOL, [english], HELD_ZH, None, tmp_path / "tok")
    small = run(VocabConfig(method="continued_bpe", max_new_tokens=100, max_train_chars=20_000), SMOL, TRAIN, HELD_ZH,
                None, tmp_path / "tok2")
    assert 19_000 < small["chars_learned"] <= 20_000 and small["lines_learned"] < small["lines_trained"]


@pytest.mark.slow
def test_workflow_expands_a_byte_level_base_from_its_shards(tmp_path):
    """The real snakemake, data stages then `vocab` with continued_bpe, on a tiny model with SmolLM2's tokenizer
    (vocab reads the base_model stage's checked copy of it)."""
    import subprocess
    import sys

    from support.models import tiny_hf

    base = tiny_hf(tmp_path / "smol_base", vocab=49152, tokenizer=SMOL)
    for rel in ("zh_web/cmrc2018_trial.jsonl", "en_replay/devils_dictionary.jsonl"):
        (tmp_path / "corpus" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO / "corpus" / rel, tmp_path / "corpus" / rel)
    cfg = {
        "run": "bpe", "sources": [
            {"name": "zh_web", "category": "zh_web", "paths": ["corpus/zh_web/*.jsonl"], "lang": "zh"},
            {"name": "en_replay", "category": "en_replay", "paths": ["corpus/en_replay/*.jsonl"], "lang": "en"}],
        "benchmarks": [{"name": "cmmlu", "path": str(DEMO / "benchmarks" / "cmmlu"), "layout": "cmmlu", "lang": "zh",
                        "eval_split": "test"}],
        "heldout": {"zh": str(HELD_ZH), "en": str(HELD_EN)},
        "base_model": {"path": str(base)}, "vocab": {"method": "continued_bpe", "max_new_tokens": 400},
    }
    (tmp_path / "config.yaml").write_text(json.dumps(cfg), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "results/bpe/tokenizer"],
        capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "results" / "bpe"
    manifest = read_json(run_dir / "tokenizer.stats.json")
    assert manifest["vocab"]["kind"] == "byte_bpe" and manifest["vocab"]["added"] == 400
    assert manifest["counts"]["docs_in"] > 150 and "docs_skipped/other_lang" not in manifest["counts"]  # zh shards only
    assert any(p.endswith(".parquet") for p in manifest["inputs"])
    rep = read_json(run_dir / "tokenizer.compression.json")
    assert rep["tokenizers"]["expanded"]["zh"]["tokens_per_char"] < rep["tokenizers"]["base"]["zh"]["tokens_per_char"]
    assert rep["audit"]["reachable"] == 400


def test_written_folder_keeps_every_chat_template_of_the_base(tmp_path):
    """continued_bpe's folder carries the base's chat_template.jinja and its named templates."""
    from transformers import AutoTokenizer

    from cptflow.tokenizer.bpe_expand import write_folder

    base = shutil.copytree(SMOL, tmp_path / "base")
    (base / "additional_chat_templates").mkdir()
    (base / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    write_folder(load_base(base).data, base, tmp_path / "out")
    want = AutoTokenizer.from_pretrained(str(base)).chat_template
    assert isinstance(want, dict) and set(want) == {"default", "tool_use"}
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template == want
