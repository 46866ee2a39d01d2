"""Normalisation on real demo text: NFKC, the CJK punctuation exception, control characters,
whitespace, traditional → simplified."""

from __future__ import annotations

import json

from conftest import DEMO, read_texts

from cptflow.data.clean import CleanConfig, normalise_text
from cptflow.data.normalise import CJK_PUNCTUATION, normalise_counted

CORPUS = DEMO / "corpus"


def _line(path, lineno: int) -> str:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if i == lineno:
                return json.loads(line)["text"]
    raise IndexError(lineno)


def test_nfkc_folds_fullwidth_digits_and_letters_but_keeps_cjk_punctuation():
    text = _line(CORPUS / "zh_web/cmrc2018_dev.jsonl", 214)  # a real Wikipedia paragraph
    assert "（１２０１）" in text
    out = normalise_text(text, "zh", CleanConfig())
    assert "（1201）" in out  # digits folded, full-width brackets kept
    assert "１" not in out and "，" in out and "," not in out
    latin = _line(CORPUS / "zh_web/cmrc2018_dev.jsonl", 36)
    assert "A．Ｌ．纳戴" in latin
    assert "A.L.纳戴" in normalise_text(latin, "zh", CleanConfig())


def test_keep_cjk_punctuation_off_turns_chinese_punctuation_ascii():
    text = _line(CORPUS / "zh_books/tang300.jsonl", 3)  # 經鄒魯祭孔子而歎之: has ， 。 and ？
    kept = normalise_text(text, "zh", CleanConfig())
    folded = normalise_text(text, "zh", CleanConfig(keep_cjk_punctuation=False))
    assert "，" in kept and "？" in kept and kept == text
    assert "，" not in folded and "？" not in folded
    assert folded == text.replace("，", ",").replace("？", "?")
    assert "。" in folded  # U+3002 has no compatibility mapping: NFKC never touches it


def test_cjk_punctuation_is_only_protected_in_chinese_documents():
    text = "Ｈｅｌｌｏ，ｗｏｒｌｄ！（ok）…"
    assert normalise_text(text, "en", CleanConfig()) == "Hello,world!(ok)..."
    assert normalise_text(text, "zh", CleanConfig()) == "Hello，world！（ok）…"
    assert set(CJK_PUNCTUATION) <= set(normalise_text(CJK_PUNCTUATION, "zh", CleanConfig()))


def test_control_and_zero_width_characters_are_removed():
    text = _line(CORPUS / "zh_books/song300.jsonl", 1)
    dirty = "\ufeff" + text.replace("，", "\u200b，\x00").replace("。", "。\u200d\x07\u00ad", 2) + "\x1b[0m"
    counts: dict[str, int] = {}
    out = normalise_counted(dirty, "zh", CleanConfig(), counts)
    assert out == text + "[0m"  # ESC removed; its printable tail is ordinary text
    assert counts["normalise/control_chars_removed"] == dirty.count("\u200b") * 2 + 1 + 1 + 3 * 2


def test_whitespace_line_endings_and_blank_lines():
    cfg = CleanConfig()
    assert normalise_text("a\r\nb\rc\u2028d", "en", cfg) == "a\nb\nc\nd"
    assert normalise_text("one  two \t three   \n\n\n\n\nfour  ", "en", cfg) == "one two three\n\n\nfour"
    assert normalise_text("x\n\n\n\ny", "en", CleanConfig(max_blank_lines=1)) == "x\n\ny"
    assert normalise_text("  \n\u3000\u3000第一章\n", "zh", cfg) == "第一章"


def test_code_indentation_survives_normalisation():
    text = _line(CORPUS / "zh_web/rust_book_cn.jsonl", 72)  # chapter with nested ```rust blocks
    out = normalise_text(text, "zh", CleanConfig())
    indented = [ln for ln in text.split("\n") if ln.startswith("    ") and ln.strip()]
    assert len(indented) > 5
    out_lines = set(out.split("\n"))
    for ln in indented:
        lead = ln[: len(ln) - len(ln.lstrip())]
        assert lead + " ".join(ln.split()) in out_lines  # leading indentation verbatim, inner runs collapsed


def test_t2s_converts_real_traditional_text_only_when_asked_and_only_for_zh():
    text = _line(CORPUS / "zh_books/mengxue_tang300.jsonl", 1)
    assert text == "行宮 元稹\n寥落古行宮，宮花寂寞紅。\n白頭宮女在，閒坐說玄宗。"
    counts: dict[str, int] = {}
    out = normalise_counted(text, "zh", CleanConfig(t2s=True), counts)
    assert out == "行宫 元稹\n寥落古行宫，宫花寂寞红。\n白头宫女在，闲坐说玄宗。"
    assert counts["normalise/t2s_chars_changed"] == 8
    assert normalise_text(text, "zh", CleanConfig()) == text  # off by default
    assert normalise_text(text, "en", CleanConfig(t2s=True)) == text.replace("，", ",")


def test_normalisation_is_idempotent_and_deterministic_on_real_documents():
    cfg = CleanConfig(t2s=True)
    for path, lang in [("zh_web/wangdoc_bash.jsonl", "zh"), ("zh_books/tang300.jsonl", "zh"),
                       ("en_replay/devils_dictionary.jsonl", "en")]:
        for text in read_texts(CORPUS / path, 30):
            once = normalise_text(text, lang, cfg)
            assert normalise_text(once, lang, cfg) == once
            assert normalise_text(text, lang, cfg) == once


def test_ascii_punctuation_after_han_becomes_fullwidth_in_chinese_only():
    cfg = CleanConfig()
    shu = next(t for t in read_texts(CORPUS / "zh_books/mengxue_tang300.jsonl") if "蜀道之難,難" in t)
    assert "蜀道之難，難於上青天" in normalise_text(shu, "zh", cfg)
    rust = _line(CORPUS / "zh_web/rust_book_cn.jsonl", 72)
    assert "文件名: src/lib.rs" in rust
    out = normalise_text(rust, "zh", cfg)
    assert "文件名：src/lib.rs" in out and "use crate::front_of_house::hosting;" in out  # code untouched
    assert normalise_text("共3,000人, ratio a:b", "zh", cfg) == "共3,000人，ratio a:b"
    assert normalise_text("你好, 世界", "zh", CleanConfig(keep_cjk_punctuation=False)) == "你好, 世界"
    assert normalise_text("你好, 世界", "en", cfg) == "你好, 世界"


def test_half_width_copy_of_a_document_normalises_to_the_original():
    """A web copy typed with ASCII punctuation and stray spaces becomes byte-identical to the
    original, so exact dedup after clean finds it."""
    original = _line(CORPUS / "zh_web/cmrc2018_dev.jsonl", 4)
    copy = original.replace("，", ", ").replace("：", ":") + "  "
    cfg = CleanConfig()
    assert copy != original
    assert normalise_text(copy, "zh", cfg) == normalise_text(original, "zh", cfg) == original


def test_quadratic_cleaning_is_gone_100k_spaces_or_nbsp_inside_a_line():
    """The case of issue 14: 100,000 spaces (or NBSP, which NFKC makes spaces) inside one line took 55 s
    (20 k: 1.7 s, 40 k: 7.5 s: quadratic) in the trailing-whitespace step. Now linear: bounded by
    normal text of the same length, in a child process that is killed at the bound."""
    from support.linear_time import assert_linear

    cfg = CleanConfig()
    runs = ("spaces", "nbsp", "ideographic_spaces", "tabs_and_spaces", "space_newline")
    times = assert_linear(lambda t: normalise_counted(t, "zh", cfg), only=runs)
    assert normalise_counted("a" + "\xa0" * 100_000 + "b \n", "zh", cfg) == "a b"
    assert set(times) >= {"spaces", "nbsp", "tabs_and_spaces"}
