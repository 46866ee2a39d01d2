"""Decontamination (cptflow.data.decontaminate): real benchmark questions planted in real corpus documents."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import schema_section, read_texts

from cptflow.eval.benchmarks import BenchmarkSpec, read_questions
from cptflow.core.config import ConfigError
from cptflow.data import decontaminate, decontaminate_index
from cptflow.data.contamination import SEED, DecontaminateConfig, build_index, find_match, prepare_lookup
from cptflow.data.decontaminate import run_apply
from cptflow.data.decontaminate_index import resolve_benchmarks
from cptflow.data.minhash import multipliers, normalise_for_hash

LAYOUT = {"ceval": ("ceval", "zh"), "cmmlu": ("cmmlu", "zh"), "mmlu": ("mmlu", "en")}


@pytest.fixture(scope="module")
def specs(demo_dir):
    return [{"name": n, "path": str(demo_dir / "benchmarks" / n), "layout": lay, "lang": lang}
            for n, (lay, lang) in LAYOUT.items()]


@pytest.fixture(scope="module")
def questions(specs):
    out = {}
    for s in specs:
        spec = BenchmarkSpec(**s)
        for split in ("dev", "val", "test"):
            if (Path(spec.path) / split).is_dir():
                out[(spec.name, split)] = list(read_questions(spec, split))
    return out


def units(text: str, lang: str) -> int:
    norm = normalise_for_hash(text, lang)
    return len(norm) if lang == "zh" else len(norm.split())


def pick(qs, lang, lo, hi, need=lambda q: True):
    """First question whose stem has lo <= units < hi and whose normalised stem is unique in qs."""
    counts: dict[str, int] = {}
    for q in qs:
        counts[normalise_for_hash(q.question, lang)] = counts.get(normalise_for_hash(q.question, lang), 0) + 1
    return next(q for q in qs if lo <= units(q.question, lang) < hi and need(q)
                and counts[normalise_for_hash(q.question, lang)] == 1)


def match_of(q) -> dict[str, str]:
    return {"benchmark": q.benchmark, "subject": q.subject, "split": q.split, "qid": q.qid}


HALF = str.maketrans({"，": ",", "。": ".", "：": ":", "；": ";", "“": '"', "”": '"', "（": "(", "）": ")", "？": "?"})


def to_half_width(t: str) -> str:
    return " ".join(t.translate(HALF)[i:i + 7] for i in range(0, len(t), 7))  # and spaces every 7 characters


def embed(doc: str, inserted: str) -> str:
    cut = len(doc) // 2
    return doc[:cut] + "\n" + inserted + "\n" + doc[cut:]


@pytest.fixture(scope="module")
def planted(demo_dir, questions, tmp_path_factory):
    root = tmp_path_factory.mktemp("decon")
    corpus = demo_dir / "corpus"
    zh = read_texts(corpus / "zh_web" / "cmrc2018_dev.jsonl", 30)
    en = read_texts(corpus / "en_replay" / "devils_dictionary.jsonl", 12)
    ceval_long = pick(questions[("ceval", "val")], "zh", 20, 10**6, lambda q: "，" in q.question)
    cmmlu_short = pick(questions[("cmmlu", "test")], "zh", 10, 20)
    cmmlu_dev = pick(questions[("cmmlu", "dev")], "zh", 20, 10**6)
    mmlu_long = pick(questions[("mmlu", "test")], "en", 13, 10**6, lambda q: "," in q.question)
    mmlu_short = pick(questions[("mmlu", "test")], "en", 8, 13)
    long_option = next((q, o) for q in questions[("ceval", "val")] for o in q.options if units(o, "zh") >= 20)
    tiny = pick(questions[("cmmlu", "test")], "zh", 1, 10)
    docs, expected = [], {}

    def add(text: str, lang: str, match=None):
        docs.append({"id": f"planted/docs:{len(docs) + 1}", "text": text, "source": "planted", "category": "planted",
                     "lang": lang})
        if match:
            expected[docs[-1]["id"]] = match

    add(embed(zh[0], to_half_width(ceval_long.question)), "zh", match_of(ceval_long))
    add(embed(zh[1], cmmlu_short.question + "（  ）\nA．" + cmmlu_short.options[0]), "zh", match_of(cmmlu_short))
    add(embed(zh[2], to_half_width(cmmlu_dev.question)), "zh", match_of(cmmlu_dev))
    mmlu_variant = mmlu_long.question.upper().replace(",", "，").replace(" ", "\n  ").replace("'", "’")
    add(embed(en[0], mmlu_variant), "en", match_of(mmlu_long))
    add(embed(en[1], "Question: " + mmlu_short.question + " Answer:"), "en", match_of(mmlu_short))
    add(embed(zh[3], "答案：" + long_option[1]), "zh", match_of(long_option[0]))
    add(embed(zh[4], "英文题：" + mmlu_long.question), "zh", match_of(mmlu_long))  # an English question in Chinese text
    # not contamination: 19 characters of a long question, and a stem too short to protect
    add(embed(zh[5], normalise_for_hash(ceval_long.question, "zh")[:19]), "zh")
    add(embed(zh[6], tiny.question), "zh")
    for t in zh[7:30]:
        add(t, "zh")
    for t in en[2:12]:
        add(t, "en")
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return {"root": root, "docs": docs, "path": path, "expected": expected, "tiny": tiny}


def build(root: Path, specs, params=None) -> Path:
    out = root / "index.npz"
    assert decontaminate_index.main(["--params", json.dumps(params or {}), "--benchmarks", json.dumps(specs),
                 "--output", str(out), "--stats", str(root / "index.stats.json")]) == 0
    return out


def test_planted_questions_are_dropped_with_their_match(planted, specs):
    root = planted["root"]
    index = build(root, specs)
    out, dropped = root / "kept.jsonl", root / "dropped.jsonl"
    assert decontaminate.main(["--input", str(planted["path"]), "--index", str(index), "--output", str(out),
                 "--dropped", str(dropped), "--stats", str(root / "apply.stats.json")]) == 0
    got = [json.loads(line) for line in dropped.read_text(encoding="utf-8").splitlines()]
    assert {d["id"]: d["match"] for d in got} == planted["expected"]
    assert all(d["reason"] == "decontaminate_ngram" for d in got)
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert kept == [d for d in planted["docs"] if d["id"] not in planted["expected"]]
    stats = json.loads((root / "apply.stats.json").read_text())
    c = stats["counts"]
    assert c["docs_in"] == len(planted["docs"]) and c["docs_out"] == len(kept)
    assert c["dropped/decontaminate_ngram"] == 7
    assert (c["matched/ceval"], c["matched/cmmlu"], c["matched/mmlu"]) == (2, 2, 3)
    assert [d["id"] for d in stats["dropped"]] == [d["id"] for d in got]
    istats = json.loads((root / "index.stats.json").read_text())
    assert match_of(planted["tiny"]) in istats["unprotected"]
    ic = istats["counts"]
    assert ic["questions/ceval/val"] == 62 and ic["questions/cmmlu/test"] == 480 and ic["questions/mmlu/test"] == 645
    assert ic["questions_ngram"] + ic["questions_whole"] + ic["questions_unprotected"] == 15 * 3 + 62 + 480 + 645


def test_index_is_deterministic_and_checked(planted, specs, tmp_path):
    first = build(tmp_path / "a", specs)
    second = build(tmp_path / "b", specs)
    assert first.read_bytes() == second.read_bytes()
    with np.load(first) as z:
        for kind in ("char", "word"):
            keys = z[f"{kind}_keys"]
            assert keys.dtype == np.uint64 and np.all(keys[1:] > keys[:-1])  # sorted, unique
    cfg = DecontaminateConfig(ngram_chars=25)
    with pytest.raises(ValueError, match="rebuild it"):
        run_apply(cfg, planted["path"], first, tmp_path / "k", tmp_path / "d", tmp_path / "s")


def test_clean_demo_corpus_is_not_flagged(demo_dir, specs):
    """Precision on real text: none of the 3,977 demo corpus and held-out documents contains a question."""
    cfg = DecontaminateConfig()
    qs = [(q, s["lang"]) for s in specs for split in ("dev", "val", "test")
          if (Path(s["path"]) / split).is_dir() for q in read_questions(BenchmarkSpec(**s), split)]
    arrays, _ = build_index(qs, cfg)
    lookup = prepare_lookup(arrays)
    mult = multipliers(0xDEC0, 20)
    files = sorted((demo_dir / "corpus").glob("*/*.jsonl")) + sorted((demo_dir / "heldout").glob("*.jsonl"))
    texts = [t for f in files for t in read_texts(f)]
    assert len(texts) == 3977
    assert [t[:60] for t in texts if find_match(t, lookup, mult) is not None] == []


def test_benchmark_selection(specs, demo_dir):
    assert [b.name for b in resolve_benchmarks(DecontaminateConfig(), specs)] == ["ceval", "cmmlu", "mmlu"]
    assert [b.name for b in resolve_benchmarks(DecontaminateConfig(benchmarks=["mmlu"]), specs)] == ["mmlu"]
    assert resolve_benchmarks(DecontaminateConfig(benchmarks=[specs[0]]), [])[0].layout == "ceval"
    with pytest.raises(ConfigError, match="not a configured benchmark"):
        resolve_benchmarks(DecontaminateConfig(benchmarks=["agieval"]), specs)
    with pytest.raises(ValueError, match="min_chars"):
        DecontaminateConfig(min_chars=30)


def test_missing_splits_are_an_error(specs, tmp_path):
    params = json.dumps({"splits": ["train"]})
    assert decontaminate_index.main(["--params", params, "--benchmarks", json.dumps(specs), "--output", str(tmp_path / "i.npz"),
                 "--stats", str(tmp_path / "s.json")]) == 2
    assert not (tmp_path / "i.npz").exists()


def test_schema_fragment_matches_config(repo):
    schema = schema_section("decontaminate")
    assert schema["additionalProperties"] is False
    fields = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(DecontaminateConfig)}
    assert set(schema["properties"]) == set(fields)
    for name, default in fields.items():
        assert schema["properties"][name]["default"] == default, name
        assert schema["properties"][name]["description"]


def test_decontaminate_is_linear_time_on_pathological_text(questions):
    """Matching a 256 KiB pathological document against the demo benchmarks' index: within 10x the time
    of real text of the same size."""
    from support.linear_time import assert_linear

    cfg = DecontaminateConfig()
    langs = {"ceval": "zh", "cmmlu": "zh", "mmlu": "en"}
    index, _ = build_index([(q, langs[b]) for (b, _), qs in questions.items() for q in qs], cfg)
    lookup, mult = prepare_lookup(index), multipliers(SEED, max(cfg.ngram_chars, cfg.ngram_words))
    assert_linear(lambda t: find_match(t, lookup, mult), size=1 << 18)
