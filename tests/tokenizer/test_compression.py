"""Compression report: tokens per character, the same number from sentencepiece, HF and a function."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO, read_texts
from cptflow.tokenizer.compression import compare, compression, main, markdown_table, read_texts as read_heldout, sp_tokenizer
from cptflow.core.io import read_json
from cptflow.tokenizer.sp_merge import load_proto
from cptflow.tokenizer.sp_to_hf import save_hf_tokenizer

MODEL = DEMO / "tokenizer" / "tokenizer.model"
HELD_ZH, HELD_EN = DEMO / "heldout" / "zh_modern.jsonl", DEMO / "heldout" / "en.jsonl"


@pytest.fixture(scope="module")
def sp():
    return sp_tokenizer(MODEL)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("base_hf")
    base_cfg = json.loads((DEMO / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    save_hf_tokenizer(load_proto(MODEL.read_bytes()), d, base_cfg)
    return AutoTokenizer.from_pretrained(str(d))


def test_tokens_per_char_of_the_base_on_heldout(sp):
    zh, en = read_texts(HELD_ZH), read_texts(HELD_EN)
    r = compression(sp, zh)
    assert r["texts"] == 116 and r["chars"] == sum(len(t) for t in zh) == 70286
    assert r["tokens"] == sum(len(sp.encode(t)) for t in zh)
    assert r["tokens_per_char"] == pytest.approx(r["tokens"] / r["chars"]) and 1.15 < r["tokens_per_char"] < 1.25
    assert r["chars_per_token"] == pytest.approx(1 / r["tokens_per_char"])
    assert 0.3 < compression(sp, en)["tokens_per_char"] < 0.35  # English is cheap for a LLaMA tokenizer


def test_characters_are_code_points_not_bytes(sp):
    r = compression(sp, ["中文", "𠀀"])  # a 4-byte UTF-8 character outside the BMP counts once
    assert r["chars"] == 3


def test_same_counts_from_sentencepiece_hf_and_a_function(sp, hf):
    texts = read_texts(HELD_ZH, 20) + read_texts(HELD_EN, 10) + ["literal <s> and [INST] in text", "  leading"]
    want = compression(sp, texts)
    assert compression(hf, texts) == want  # no BOS counted; "<s>" in text stays characters
    assert compression(lambda t: sp.encode(t), texts) == want
    assert compression(sp, texts, batch=3) == want


def test_empty_input_gives_no_ratio(sp):
    assert compression(sp, []) == {"texts": 0, "chars": 0, "tokens": 0, "tokens_per_char": None, "chars_per_token": None}


def test_compare_and_markdown_table(sp):
    other = sp_tokenizer(MODEL.read_bytes())
    rep = compare({"base": sp, "again": other}, {"zh": read_texts(HELD_ZH, 5), "en": read_texts(HELD_EN, 5)})
    assert rep["order"] == ["base", "again"] and rep["languages"] == ["zh", "en"]
    assert rep["tokenizers"]["base"]["vocab_size"] == 32768
    assert rep["tokenizers"]["base"]["zh"] == rep["tokenizers"]["again"]["zh"]
    md = markdown_table(rep).splitlines()
    assert md[0] == "| tokenizer | vocab size | zh tokens/char | zh chars/token | en tokens/char | en chars/token |"
    assert md[2].startswith("| base | 32768 | ") and md[3].startswith("| again | 32768 | ")
    assert f"{rep['tokenizers']['base']['zh']['tokens_per_char']:.3f}" in md[2]


def test_read_heldout_names_bad_record(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"text": "a"}\n{"txt": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"h.jsonl:2: no string field"):
        read_heldout(p)


def test_cli_writes_json_and_markdown(tmp_path, sp):
    rc = main(["--tokenizer", f"base={MODEL}", "--heldout", f"zh={HELD_ZH}", "--heldout", f"en={HELD_EN}",
               "--report-json", str(tmp_path / "c.json"), "--report-md", str(tmp_path / "c.md")])
    assert rc == 0
    rep = read_json(tmp_path / "c.json")
    assert rep["tokenizers"]["base"]["zh"] == compression(sp, read_texts(HELD_ZH))
    assert (tmp_path / "c.md").read_text(encoding="utf-8").startswith("| tokenizer | vocab size |")
    assert main(["--tokenizer", "nope", "--heldout", f"zh={HELD_ZH}", "--report-json", str(tmp_path / "x.json")]) == 2
