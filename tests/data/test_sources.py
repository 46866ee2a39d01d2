from pathlib import Path

import pytest

from cptflow.core.config import ConfigError
from cptflow.data.sources import part_name, resolve_sources


def test_demo_sources_resolve_to_one_entry_per_file(repo):
    files = resolve_sources(
        [{"name": "zh_web", "category": "zh_web", "paths": ["workflow/resources/demo/corpus/zh_web/*.jsonl"]}], repo
    )
    assert [f.key for f in files] == ["zh_web/cmrc2018_dev", "zh_web/cmrc2018_trial", "zh_web/cmrc2019_trial",
                                      "zh_web/rust_book_cn", "zh_web/wangdoc_bash"]
    assert all(Path(f.path).exists() for f in files)
    assert all(f.lang == "zh" and f.text_field == "text" for f in files)


def test_paths_found_from_another_working_directory(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = resolve_sources(
        [{"name": "en", "category": "en", "paths": ["workflow/resources/demo/corpus/en_replay/*.jsonl"], "lang": "en"}], repo
    )
    assert files and all(Path(f.path).is_absolute() and Path(f.path).exists() for f in files)


def test_part_names_strip_corpus_extensions():
    assert part_name("a/b/web-00.jsonl.gz") == "web-00"
    assert part_name("x.parquet") == "x"
    with pytest.raises(ConfigError, match="unsupported"):
        part_name("notes.txt")


def test_errors_name_the_source(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text("")
    (tmp_path / "b" / "x.jsonl.gz").write_text("")
    with pytest.raises(ConfigError, match=r"sources\[0\] \(s\).*part name 'x'"):
        resolve_sources([{"name": "s", "category": "c", "paths": ["a/*.jsonl", "b/*.gz"]}], tmp_path)
    with pytest.raises(ConfigError, match="matches no file"):
        resolve_sources([{"name": "s", "category": "c", "paths": ["nothing/*.jsonl"]}], tmp_path)
