"""How the demo data in this folder was cut from the project's shared data set (for provenance).

Users never run this: the slices are committed. It documents exactly which real documents the demo
ships (see SOURCES.md here for repositories, commits and licences) and lets a maintainer recut them:

    python workflow/resources/demo/slice_from_shared.py ../shared/data
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (output file, corpus file, source prefix, first N documents of that source, or a (start, stop) slice)
CORPUS = [
    ("corpus/zh_web/cmrc2018_dev.jsonl", "zh_modern.jsonl", "cmrc2018/squad-style-data/cmrc2018_dev.json", 848),
    ("corpus/zh_web/cmrc2018_trial.jsonl", "zh_modern.jsonl", "cmrc2018/squad-style-data/cmrc2018_trial.json", 200),
    ("corpus/zh_web/cmrc2019_trial.jsonl", "zh_modern.jsonl", "cmrc2019/data/cmrc2019_trial.json", 139),
    ("corpus/zh_web/rust_book_cn.jsonl", "zh_modern.jsonl", "rust-lang-cn/book-cn/", 80),
    ("corpus/zh_web/wangdoc_bash.jsonl", "zh_modern.jsonl", "wangdoc/bash-tutorial/", 108),
    ("corpus/zh_books/tang300.jsonl", "zh_classical.jsonl", "chinese-poetry/全唐诗/唐诗三百首.json", 366),
    ("corpus/zh_books/mengxue_tang300.jsonl", "zh_classical.jsonl", "chinese-poetry/蒙学/tangshisanbaishou.json", 320),
    ("corpus/zh_books/song300.jsonl", "zh_classical.jsonl", "chinese-poetry/宋词/宋词三百首.json", 280),
    ("corpus/zh_books/ci_song_0.jsonl", "zh_classical.jsonl", "chinese-poetry/宋词/ci.song.0.json", 1000),
    ("corpus/zh_books/tang_error_0.jsonl", "zh_classical.jsonl", "chinese-poetry/全唐诗/error/poet.tang.0.json", 280),
    ("corpus/en_replay/news_from_nowhere.jsonl", "en_gutenberg.jsonl", "gutenberg/3261.txt", 80),
    ("corpus/en_replay/news_from_nowhere_old.jsonl", "en_gutenberg.jsonl", "gutenberg/3261-old/", 80),
    ("corpus/en_replay/devils_dictionary.jsonl", "en_gutenberg.jsonl", "gutenberg/972.txt", 40),
    # Held-out modern Chinese: stories and Wikipedia articles the corpus above does not contain.
    ("heldout/zh_modern.jsonl", "zh_modern.jsonl", "cmrc2019/data/cmrc2019_dev.json", 60),
    ("heldout/zh_modern.jsonl", "zh_modern.jsonl", "cmrc2018/squad-style-data/cmrc2018_trial.json", (200, 256)),
    ("heldout/en.jsonl", "en_gutenberg.jsonl", "char-rnn/tinyshakespeare/", 40),
]

BENCHMARKS = {
    "ceval": ["dev/{s}_dev.csv", "val/{s}_val.csv"],
    "cmmlu": ["dev/{s}.csv", "test/{s}.csv"],
    "mmlu": ["dev/{s}_dev.csv", "test/{s}_test.csv"],
}
SUBJECTS = {
    "ceval": ["computer_architecture", "high_school_chinese", "logic"],
    "cmmlu": ["agronomy", "chinese_foreign_policy", "computer_science"],
    "mmlu": ["marketing", "philosophy", "us_foreign_policy"],
}

C3_PASSAGES = 30  # 51 questions: 37 with four options, 4 with three, 10 with two


def main(shared: Path) -> None:
    by_file: dict[str, list[str]] = defaultdict(list)
    for out, corpus, prefix, n in CORPUS:
        with open(shared / "corpus" / corpus, encoding="utf-8") as f:
            lines = [line for line in f if json.loads(line)["source"].startswith(prefix)]
        start, stop = n if isinstance(n, tuple) else (0, n)
        by_file[out] += lines[start:stop]
    for out, lines in by_file.items():
        p = HERE / out
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(lines), encoding="utf-8")
    for bench, patterns in BENCHMARKS.items():
        for s in SUBJECTS[bench]:
            for pat in patterns:
                rel = pat.format(s=s)
                dst = HERE / "benchmarks" / bench / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shared / bench / rel, dst)
    # C3 (reading comprehension): the first C3_PASSAGES passages of the dev file, serialised as upstream
    # does (json indent=1, UTF-8), so the slice is a byte-for-byte prefix of the published records.
    c3 = json.loads((shared / "c3" / "c3-m-dev.json").read_text(encoding="utf-8"))
    dst = HERE / "benchmarks" / "c3" / "c3-m-dev.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(c3[:C3_PASSAGES], ensure_ascii=False, indent=1), encoding="utf-8")
    tok = HERE / "tokenizer"
    tok.mkdir(exist_ok=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(shared / "tokenizer" / "mistral-7b-v0.3" / name, tok / name)
    (HERE / "sft").mkdir(exist_ok=True)  # SFT conversations: the whole file, byte for byte
    shutil.copyfile(shared / "sft" / "firefly_dummy_data.jsonl", HERE / "sft" / "firefly_dummy_data.jsonl")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
