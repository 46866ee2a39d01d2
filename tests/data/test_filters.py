"""One test per rule filter: a real demo document that must pass, and a broken variant of real text
(built here) that must be dropped with the filter's reason."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from conftest import DEMO

from cptflow.data.clean import CleanConfig, clean_document
from cptflow.core.config import ConfigError
from cptflow.data.filters import char_shares, dup_ngram_fraction, filter_reason, top_ngram_fraction, units

CORPUS = DEMO / "corpus"
CFG = CleanConfig()


def _line(rel: str, lineno: int) -> str:
    with open(CORPUS / rel, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if i == lineno:
                return json.loads(line)["text"]
    raise IndexError(lineno)


def reason(text: str, lang: str, cfg: CleanConfig = CFG) -> str | None:
    return clean_document(text, lang, cfg)[1]


def test_length_bounds():
    fragment = _line("zh_books/ci_song_0.jsonl", 564)  # 失调名 晏殊: a surviving one-line fragment
    assert len(fragment) < 16 and reason(fragment, "zh") is None
    assert reason("附录", "zh") == "clean_too_short"  # a bare heading left by splitting markdown
    assert reason(" \n\u200b\t ", "zh") == "clean_empty"
    long_doc = _line("zh_web/cmrc2018_dev.jsonl", 1)
    assert reason(long_doc, "zh") is None
    assert reason(long_doc, "zh", dataclasses.replace(CFG, max_chars=100)) == "clean_too_long"
    assert reason("附录", "zh", dataclasses.replace(CFG, min_chars=None)) is None  # None turns it off


def test_min_cjk_ratio_keeps_code_tutorials_and_drops_non_chinese_text():
    tutorial = _line("zh_web/wangdoc_bash.jsonl", 32)  # `nl`: one Chinese line around a Lorem ipsum block
    assert 0.05 < char_shares(tutorial, "")["cjk"] < 0.07
    assert reason(tutorial, "zh") is None
    stripped = re.sub("[\u4e00-\u9fff]", "", tutorial)  # the same page without its Chinese
    assert reason(stripped, "zh") == "clean_low_cjk"
    assert reason(stripped, "en") is None  # the check is for Chinese sources only
    assert reason(stripped, "zh", dataclasses.replace(CFG, min_cjk_ratio=None)) is None


def test_placeholders_drop_lacuna_ridden_records_but_not_one_missing_character():
    one_gap = _line("zh_books/tang_error_0.jsonl", 1)  # 守歲: 冰□已鏤津
    assert one_gap.count("□") == 1 and reason(one_gap, "zh") is None
    ruined = _line("zh_books/tang_error_0.jsonl", 7)  # 石橋: two lines entirely □□□□□
    assert ruined.count("□") >= 15 and reason(ruined, "zh") == "clean_placeholders"
    mojibake = _line("zh_web/cmrc2018_dev.jsonl", 2).replace("的", "\ufffd")
    assert reason(mojibake, "zh") == "clean_placeholders"


def test_symbol_ratio():
    table = _line("zh_web/rust_book_cn.jsonl", 6)  # Rust operator table: `|`, `<`, `>`, `^` ...
    assert char_shares(table, "")["symbol"] > 0.2
    assert reason(table, "zh") is None
    decorated = "".join(ch + "★♥" for ch in _line("zh_books/song300.jsonl", 2))
    assert reason(decorated, "zh") == "clean_too_many_symbols"


def test_digit_ratio():
    racing = _line("zh_web/cmrc2018_dev.jsonl", 350)  # 跑马地锦标: distances and seasons
    assert char_shares(racing, "")["digit"] > 0.25
    assert reason(racing, "zh") is None
    table = racing + "\n" + "\n".join(f"{i:04d} {i * 7919 % 100000:05d} {i * 31:06d}" for i in range(60))
    assert reason(table, "zh") == "clean_too_many_digits"


def test_duplicate_lines_by_count_and_by_characters():
    sort_doc = _line("zh_web/wangdoc_bash.jsonl", 36)  # `sort`: the same letters listed three times
    assert reason(sort_doc, "zh") is None  # Gopher's 0.30 would drop this real tutorial
    poem = _line("zh_books/tang300.jsonl", 1).split("\n")
    spam = "\n".join(poem + poem[1:] * 4)  # every verse line five times
    assert reason(spam, "zh") == "clean_dup_lines"
    prose = _line("en_replay/news_from_nowhere.jsonl", 20).split("\n")
    long_line = " ".join(prose)  # one long line repeated after many short distinct ones
    mixed = "\n".join([*(f"Chapter {w}" for w in "ABCDEFGHIJKL"), long_line, long_line])
    assert reason(mixed, "en", dataclasses.replace(CFG, max_dup_ngram_fraction=(None,) * 6)) == "clean_dup_line_chars"


def test_top_ngram_catches_keyword_stuffing_in_both_languages():
    prose = _line("en_replay/devils_dictionary.jsonl", 10)
    assert reason(prose, "en") is None
    stuffed = " ".join(f"cheap watches {w}" for w in prose.split()[:150])
    assert top_ngram_fraction(units(stuffed, False), 2) > 0.5
    assert reason(stuffed, "en") == "clean_top_ngram"
    wiki = _line("zh_web/cmrc2018_dev.jsonl", 5)
    assert reason(wiki, "zh") is None
    zh_stuffed = "".join(ch + "手机" for ch in wiki[:300])
    assert reason(zh_stuffed, "zh") == "clean_top_ngram"


def test_duplicated_ngrams_word_level_for_english_character_level_for_chinese():
    para = " ".join(_line("en_replay/devils_dictionary.jsonl", 12).split()[:120])
    assert reason(para, "en") is None
    assert dup_ngram_fraction(units(para + " " + para, False), 10) == pytest.approx(0.5, abs=0.01)
    assert reason(" ".join([para] * 3), "en") == "clean_dup_ngram"
    poem = _line("zh_books/song300.jsonl", 1)
    body = "".join(poem.split("\n")[1:])
    assert reason(poem, "zh") is None
    assert reason(poem.split("\n")[0] + "\n" + body * 3, "zh") == "clean_dup_ngram"


def test_units_split_han_characters_and_keep_latin_runs_whole():
    assert units("用`cargo build`构建 v1.0", True) == ["用", "cargo", "build", "构", "建", "v1", "0"]
    assert units("The Devil's Dictionary", False) == ["The", "Devil", "s", "Dictionary"]


def test_blocklist_patterns_drop_gutenberg_boilerplate_not_books():
    header = _line("en_replay/devils_dictionary.jsonl", 1)
    assert reason(header, "en") == "clean_blocklist"
    book_start = _line("en_replay/news_from_nowhere_old.jsonl", 6)  # one licence line, then the novel
    assert reason(book_start, "en") is None
    assert reason(book_start, "en", dataclasses.replace(CFG, max_blocklist_hits=0)) == "clean_blocklist"


def test_blocklist_words_and_files(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# sensitive terms\n\nsex\n赌博\n", encoding="utf-8")
    patterns = tmp_path / "patterns.txt"
    patterns.write_text(r"点击\s*下载" + "\n", encoding="utf-8")
    cfg = CleanConfig(blocklist_word_files=(str(words),), blocklist_pattern_files=(str(patterns),),
                      max_blocklist_hits=0)
    wiki = _line("zh_web/cmrc2018_dev.jsonl", 5)
    assert filter_reason(wiki, True, cfg) is None
    assert filter_reason(wiki + "网上赌博", True, cfg) == "clean_blocklist"  # Chinese: substring
    assert filter_reason(wiki + "点击 下载", True, cfg) == "clean_blocklist"
    assert filter_reason("They rode through Sussex and Essex at dawn.", False, cfg) is None  # whole words only
    assert filter_reason("An essay on SEX and society.", False, cfg) == "clean_blocklist"
    with pytest.raises(ConfigError, match="pattern"):
        CleanConfig(blocklist_patterns=("(unclosed",))
    with pytest.raises(ConfigError, match="missing.txt"):
        CleanConfig(blocklist_word_files=(str(tmp_path / "missing.txt"),))
