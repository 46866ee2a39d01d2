"""The clean stage on the demo corpus: defaults keep the good documents and drop the garbage; the
CLI writes kept/dropped/manifest atomically and deterministically; config and schema agree."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import schema_section, DEMO, read_texts

from cptflow.data.clean import CleanConfig, clean_document, main
from cptflow.core.config import ConfigError, from_dict, to_dict

CORPUS = DEMO / "corpus"

# Measured with the defaults; a change of defaults must be a conscious change of these numbers.
EXPECTED_DROPS = {
    "en_replay/devils_dictionary.jsonl": (40, {"clean_blocklist": 1}),  # Gutenberg header
    "en_replay/news_from_nowhere.jsonl": (80, {"clean_blocklist": 1}),
    "en_replay/news_from_nowhere_old.jsonl": (80, {"clean_blocklist": 5}),  # old-style licence "small print"
    "zh_books/ci_song_0.jsonl": (1000, {"clean_placeholders": 4}),  # □□□ lacunae
    "zh_books/mengxue_tang300.jsonl": (320, {}),
    "zh_books/song300.jsonl": (280, {}),
    "zh_books/tang300.jsonl": (366, {}),
    "zh_books/tang_error_0.jsonl": (280, {"clean_placeholders": 1}),
    "zh_web/cmrc2018_dev.jsonl": (848, {}),
    "zh_web/cmrc2018_trial.jsonl": (200, {}),
    "zh_web/cmrc2019_trial.jsonl": (139, {}),
    "zh_web/rust_book_cn.jsonl": (80, {}),
    "zh_web/wangdoc_bash.jsonl": (108, {}),
}


def test_defaults_on_demo_corpus_keep_good_documents_and_drop_garbage():
    cfg = CleanConfig()
    for rel, (n_docs, drops) in EXPECTED_DROPS.items():
        lang = "en" if rel.startswith("en_") else "zh"
        reasons = Counter()
        n = 0
        with open(CORPUS / rel, encoding="utf-8") as f:
            for line in f:
                n += 1
                _, reason = clean_document(json.loads(line)["text"], lang, cfg)
                if reason:
                    reasons[reason] += 1
        assert (n, dict(reasons)) == (n_docs, drops), rel


def _ingested(path, src_rel: str, lang: str, lines: slice) -> None:
    with open(CORPUS / src_rel, encoding="utf-8") as f:
        texts = [json.loads(x)["text"] for x in f.readlines()[lines]]
    with open(path, "a", encoding="utf-8") as out:
        for i, t in enumerate(texts, 1):
            rec = {"id": f"s/{src_rel}:{i}", "text": t, "source": "s", "category": "c", "lang": lang}
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")


def test_cli_writes_kept_dropped_and_manifest_deterministically(tmp_path):
    src = tmp_path / "in.jsonl"
    _ingested(src, "zh_books/tang_error_0.jsonl", "zh", slice(0, 8))  # line 7 is lacuna-ridden
    _ingested(src, "en_replay/devils_dictionary.jsonl", "en", slice(0, 3))  # line 1 is the header
    _ingested(src, "zh_books/mengxue_tang300.jsonl", "zh", slice(0, 2))
    params = json.dumps({"t2s": True})
    outs = []
    for run in ("a", "b"):
        kept, dropped, stats = (tmp_path / f"{run}{ext}" for ext in (".jsonl", ".dropped.jsonl", ".stats.json"))
        argv = ["--input", str(src), "--output", str(kept), "--dropped", str(dropped), "--stats", str(stats),
                "--params", params, "--log", str(tmp_path / f"{run}.log")]
        assert main(argv) == 0
        outs.append((kept.read_bytes(), dropped.read_bytes()))
    assert outs[0] == outs[1]
    kept_recs = [json.loads(x) for x in outs[0][0].decode().splitlines()]
    dropped_recs = [json.loads(x) for x in outs[0][1].decode().splitlines()]
    assert [r["reason"] for r in dropped_recs] == ["clean_placeholders", "clean_blocklist"]
    assert list(dropped_recs[0]) == ["id", "text", "source", "category", "lang", "reason"]
    assert dropped_recs[0]["text"].startswith("石橋 信安王禕")  # dropped text is kept as it came in
    assert list(kept_recs[0]) == ["id", "text", "source", "category", "lang"]
    assert kept_recs[-2]["text"] == "行宫 元稹\n寥落古行宫，宫花寂寞红。\n白头宫女在，闲坐说玄宗。"  # t2s applied
    manifest = json.loads((tmp_path / "a.stats.json").read_text())
    c = manifest["counts"]
    assert manifest["stage"] == "clean" and manifest["params"]["t2s"] is True
    assert c["docs_in"] == 13 and c["docs_out"] == 11
    assert c["docs_in"] == c["docs_out"] + sum(v for k, v in c.items() if k.startswith("dropped/"))
    assert c["dropped/clean_placeholders"] == 1 and c["dropped/clean_blocklist"] == 1
    assert c["normalise/t2s_chars_changed"] > 0
    assert c["chars_out"] == sum(len(r["text"]) for r in kept_recs)


def test_cli_reports_bad_input_with_file_and_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "x:1", "text": "你好世界你好世界你好", "lang": "zh"}\n{"id": "x:2", "text": 3}\n', encoding="utf-8")
    argv = ["--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--dropped", str(tmp_path / "d.jsonl"),
            "--stats", str(tmp_path / "s.json")]
    assert main(argv) == 2
    assert "in.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_config_rejects_typos_and_inconsistent_values():
    with pytest.raises(ConfigError, match="min_char"):
        from_dict(CleanConfig, {"min_char": 5}, "clean")
    with pytest.raises(ConfigError, match="6 values"):
        from_dict(CleanConfig, {"max_dup_ngram_fraction_zh": [0.5, 0.5]}, "clean")
    with pytest.raises(ConfigError, match="min_chars"):
        CleanConfig(min_chars=100, max_chars=10)
    cfg = from_dict(CleanConfig, {"max_top_ngram_fraction": [0.2, None, 0.1]}, "clean")
    assert cfg.max_top_ngram_fraction == (0.2, None, 0.1)
    assert cfg == from_dict(CleanConfig, to_dict(cfg), "clean")  # round trip through JSON params


def test_schema_fragment_matches_dataclass():
    schema = schema_section("clean")
    assert schema["additionalProperties"] is False
    assert {k: v["default"] for k, v in schema["properties"].items()} == to_dict(CleanConfig())


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_clean_is_linear_time_on_pathological_text(lang):
    """Normalisation and every filter (max_chars off, so none is skipped) on 1 MiB runs of spaces, NBSP,
    one character, nested brackets, ...: at most 10x the time of real text of the same size."""
    from support.linear_time import assert_linear

    cfg = CleanConfig(max_chars=None)
    assert_linear(lambda t: clean_document(t, lang, cfg), size=1 << 18)


def test_a_100k_character_word_never_reaches_the_english_shard(tmp_path):
    """Issue 14: no mean-word-length filter let a 100,000-character "word" through. Gopher's 3-10."""
    word = "x" * 100_000
    assert clean_document(word, "en", CleanConfig()) == (word, "clean_mean_word_length")
    text = "See https://example.org/" + word + " for details of the offer. " * 3
    assert clean_document(text, "en", CleanConfig())[1] == "clean_mean_word_length"
    assert clean_document("a b c d e f g h i j k l m n o p", "en", CleanConfig())[1] == "clean_mean_word_length"
    # Chinese has no spaces: a 100-character line of Han is one \w+ run, and no reason to drop it.
    zh = read_texts(DEMO / "corpus/zh_web/cmrc2018_dev.jsonl", 1)[0]
    assert clean_document(zh, "zh", CleanConfig())[1] is None
    # Through the stage: the document is in the dropped file with its reason, not in the output.
    good = next(t for t in read_texts(DEMO / "corpus/en_replay/devils_dictionary.jsonl")
                if clean_document(t, "en", CleanConfig())[1] is None)
    docs = [{"id": "en/a:1", "text": word, "source": "en", "category": "en", "lang": "en"},
            {"id": "en/a:2", "text": good, "source": "en", "category": "en", "lang": "en"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--dropped",
            str(tmp_path / "drop.jsonl"), "--stats", str(tmp_path / "s.json")]
    assert main(argv) == 0
    assert [json.loads(x)["id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == ["en/a:2"]
    dropped = [json.loads(x) for x in (tmp_path / "drop.jsonl").read_text().splitlines()]
    assert [(d["id"], d["reason"]) for d in dropped] == [("en/a:1", "clean_mean_word_length")]


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, database=None, derandomize=True)
@given(text=st.text(max_size=400), lang=st.sampled_from(["zh", "en"]))
def test_fuzz_clean_document_never_raises_and_keeps_only_clean_text(text, lang):
    new, reason = clean_document(text, lang, CleanConfig())
    assert isinstance(new, str)
    if reason is None:  # what is kept is non-empty, normalised (a second pass changes nothing) and has no \r
        assert new and "\r" not in new and new == new.strip()
        assert clean_document(new, lang, CleanConfig())[0] == new
    else:
        assert reason.startswith("clean_")
