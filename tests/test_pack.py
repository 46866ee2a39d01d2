"""cptflow.pack: splicing, tails, weights, replay share, buckets, int32 arrow output, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch

from cptflow.config import ConfigError, from_dict
from cptflow.hf import load_tokenizer
from cptflow.io import sha256_path
from cptflow.pack import PackConfig, main, plan_buckets, resolve_weights, run, splice, tokenize

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "workflow" / "resources" / "demo"
TOKENIZER = DEMO / "tokenizer"
BOS, EOS, PAD = 1, 2, 0
PARAMS = {"max_length": 128, "num_bins": 3, "seed": 7, "categories": {"zh_web": 1.0, "zh_books": 1.5},
          "replay": {"category": "en_replay", "share": 0.2}}


def _docs(*lens: int) -> list[np.ndarray]:
    """Synthetic documents whose tokens (>= 10) say which document they come from: doc i, token 10*(i+1)+k."""
    return [np.arange(n, dtype=np.int32) % 9 + 10 * (i + 1) for i, n in enumerate(lens)]


def test_splice_boundaries_positions_and_split_documents() -> None:
    p = splice(_docs(3, 5, 12), max_length=8, bos=BOS, eos=EOS, tail="pad", pad_id=PAD)
    # stream: [B 10 11 12 E][B 20..24 E][B 30..38 30 31 32 E] = 5 + 7 + 14 = 26 tokens -> 3 rows + 6 padded
    assert p.input_ids.dtype == np.int32 and p.position_ids.dtype == np.int32
    assert p.input_ids.tolist() == [
        [1, 10, 11, 12, 2, 1, 20, 21],
        [22, 23, 24, 2, 1, 30, 31, 32],
        [33, 34, 35, 36, 37, 38, 30, 31],
        [32, 2, 0, 0, 0, 0, 0, 0],
    ]
    assert p.position_ids.tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 2, 3],  # doc 2 continues: restarts at 0 at the row start; doc 3 starts at 0
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 0, 1, 2, 3, 4, 5],  # padding is its own segment
    ]
    assert p.real_len.tolist() == [8, 8, 8, 2]
    c = p.counts
    assert (c["docs"], c["doc_tokens"], c["stream_tokens"], c["docs_split"]) == (3, 20, 26, 2)
    assert (c["rows_packed"], c["padding_tokens"], c["tail_tokens_dropped"]) == (4, 6, 0)


def test_tail_drop_and_no_bos_eos() -> None:
    p = splice(_docs(3, 5, 12), max_length=8, bos=BOS, eos=EOS, tail="drop", pad_id=PAD)
    assert p.input_ids.shape == (3, 8) and p.real_len.tolist() == [8, 8, 8]
    assert (p.counts["tail_tokens_dropped"], p.counts["padding_tokens"]) == (2, 0)
    q = splice(_docs(3, 5), max_length=4, bos=None, eos=None, tail="drop", pad_id=PAD)
    assert q.input_ids.tolist() == [[10, 11, 12, 20], [21, 22, 23, 24]]
    assert q.position_ids.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    exact = splice(_docs(6), max_length=4, bos=BOS, eos=EOS, tail="pad", pad_id=PAD)
    assert exact.counts["padding_tokens"] == 0 and exact.input_ids.shape == (2, 4)


def test_weights_repeat_and_subsample_per_bin() -> None:
    cfg = PackConfig(num_bins=4, seed=1)
    plan = plan_buckets({"a": 101, "b": 40, "c": 30}, {"a": 2.0, "b": 0.5, "c": 1.5}, cfg)
    got = {name: np.concatenate([r for part in plan for n, r in part if n == name]) for name in "abc"}
    assert np.array_equal(np.bincount(got["a"], minlength=101), np.full(101, 2))  # every row twice
    assert len(got["b"]) == 20 and len(np.unique(got["b"])) == 20  # a seeded half, no repeats
    counts_c = np.bincount(got["c"], minlength=30)
    assert counts_c.min() == 1 and counts_c.max() == 2 and counts_c.sum() == 12 + 12 + 11 + 11  # bins 8, 8, 7, 7
    assert [sum(len(r) for n, r in part if n == "a") for part in plan] == [52, 50, 50, 50]  # bins of 26,25,25,25
    again = plan_buckets({"a": 101, "b": 40, "c": 30}, {"a": 2.0, "b": 0.5, "c": 1.5}, cfg)
    assert all(np.array_equal(r1, r2) for p1, p2 in zip(plan, again) for (_, r1), (_, r2) in zip(p1, p2))
    other_seed = plan_buckets({"a": 101, "b": 40, "c": 30}, {"a": 2.0, "b": 0.5, "c": 1.5}, PackConfig(num_bins=4, seed=2))
    assert not np.array_equal(np.concatenate([r for n, r in other_seed[0] if n == "b"]),
                              np.concatenate([r for n, r in plan[0] if n == "b"]))


def test_replay_share_per_bucket_and_no_repeat_before_exhausted() -> None:
    cfg = from_dict(PackConfig, {"num_bins": 5, "replay": {"category": "en", "share": 0.25}})
    plan = plan_buckets({"zh": 300, "en": 70}, {"zh": 1.0}, cfg)
    for part in plan:
        n_en = sum(len(r) for n, r in part if n == "en")
        n_zh = sum(len(r) for n, r in part if n == "zh")
        assert n_en == round(0.25 * n_zh / 0.75) == 20  # 60 zh rows per bucket -> 20 replay rows = 25 %
    en = np.concatenate([r for part in plan for n, r in part if n == "en"])
    assert len(en) == 100 and len(np.unique(en[:70])) == 70  # all 70 used once before any repeats
    none = plan_buckets({"zh": 300, "en": 70}, {"zh": 1.0}, PackConfig(num_bins=5))
    assert not any(n == "en" for part in none for n, _ in part)


def test_category_config_errors() -> None:
    with pytest.raises(ConfigError, match="must not also be in"):
        from_dict(PackConfig, {"categories": {"en": 1.0}, "replay": {"category": "en"}})
    with pytest.raises(ConfigError, match="tail"):
        PackConfig(tail="truncate")
    with pytest.raises(ValueError, match="does not list"):
        resolve_weights(["zh", "code"], PackConfig(categories={"zh": 1.0}))
    with pytest.raises(ValueError, match="no --shards"):
        resolve_weights(["zh"], PackConfig(categories={"zh": 1.0, "web": 2.0}))
    with pytest.raises(ValueError, match="replay.category 'en_replay' has no --shards"):
        resolve_weights(["zh"], from_dict(PackConfig, {"replay": {}}))


def test_tokenize_matches_sentencepiece() -> None:
    texts = [json.loads(line)["text"][:2000] for line in
             (DEMO / "corpus" / "zh_web" / "cmrc2018_dev.jsonl").read_text(encoding="utf-8").splitlines()[:20]]
    texts += ["The Devil's Dictionary", "", "混合 text 与 123", "literal </s> and <s> stay text"]
    got = tokenize(load_tokenizer(TOKENIZER), texts, batch_docs=7)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "tokenizer.model"))
    assert [g.tolist() for g in got] == sp.encode(texts)
    assert all(g.dtype == np.int32 for g in got)
    assert 1 not in got[-1] and 2 not in got[-1]  # special tokens in raw text are not parsed as BOS/EOS


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Small parquet shards (id, text, source, lang) from the demo corpus, two files for zh_books."""
    d = tmp_path_factory.mktemp("shards")
    spec = {"zh_web": [("cmrc2018_dev", 40)], "zh_books": [("tang300", 60), ("song300", 60)],
            "en_replay": [("devils_dictionary", 6)]}
    out: dict[str, list[str]] = {}
    for cat, files in spec.items():
        for j, (name, n) in enumerate(files):
            lines = (DEMO / "corpus" / cat / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            texts = [json.loads(x)["text"] for x in lines]
            table = pa.table({"id": [f"{name}/{name}:{i + 1}" for i in range(n)], "text": texts,
                              "source": [name] * n, "lang": ["en" if cat == "en_replay" else "zh"] * n})
            (d / cat).mkdir(exist_ok=True)
            pq.write_table(table, d / cat / f"part-{j:05d}.parquet")
            out.setdefault(cat, []).append(str(d / cat / f"part-{j:05d}.parquet"))
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, shards: dict[str, list[str]]) -> Path:
    out = tmp_path_factory.mktemp("packed")
    argv = ["--tokenizer", str(TOKENIZER), "--output-dir", str(out / "ds"), "--counts", str(out / "counts.json"),
            "--stats", str(out / "stats.json"), "--params", json.dumps(PARAMS), "--shards"]
    argv += [f"{cat}={f}" for cat, files in shards.items() for f in files]
    assert main(argv) == 0
    return out


def test_dataset_loads_with_int32_columns_in_bucket_order(packed: Path) -> None:
    ds = datasets.load_from_disk(str(packed / "ds"))
    assert ds.column_names == ["input_ids", "labels", "position_ids", "category", "bucket"]
    for col in ("input_ids", "labels", "position_ids"):
        assert ds.data.schema.field(col).type == pa.list_(pa.int32())
    assert ds.data.schema.field("bucket").type == pa.int32()
    buckets = np.array(ds["bucket"])
    assert buckets[0] == 0 and np.all(np.diff(buckets) >= 0) and set(buckets) == {0, 1, 2}
    cats = np.array(ds["category"])
    for k in range(3):  # every bucket mixes every category, not one category after another
        assert set(cats[buckets == k]) == {"zh_web", "zh_books", "en_replay"}
    t = ds.with_format("torch")[:]
    ids, labels, pos = t["input_ids"], t["labels"], t["position_ids"]
    assert ids.shape == (len(ds), 128) and ids.dtype == torch.int64  # with_format("torch") widens int32
    pad = labels == -100
    assert torch.equal(labels[~pad], ids[~pad])
    # a document starts (position 0 after the row start) exactly where a BOS is
    starts = (pos == 0) & ~pad
    assert torch.equal(starts[:, 1:], ((ids == 1) & ~pad)[:, 1:])
    assert torch.all(ids[:, 1:][(ids[:, :-1] == 2) & ~pad[:, 1:]] == 1)  # EOS is followed by BOS (or padding)
    assert int(torch.all(pos[:, 1:] == pos[:, :-1] + 1, dim=1).sum()) > 0  # some rows are inside one document


def test_counts_match_the_dataset(packed: Path) -> None:
    ds = datasets.load_from_disk(str(packed / "ds"))
    counts = json.loads((packed / "counts.json").read_text())
    assert counts["total"]["samples"] == len(ds)
    labels = np.array(ds["labels"])
    assert counts["total"]["tokens"] == int((labels != -100).sum())
    assert counts["total"]["padding_tokens"] == int((labels == -100).sum())
    cats, buckets = np.array(ds["category"]), np.array(ds["bucket"])
    for name, c in counts["categories"].items():
        assert [b["samples"] for b in c["buckets"]] == [int(np.sum((cats == name) & (buckets == k))) for k in range(3)]
        assert c["tail_tokens_dropped"] == 0 and c["padding_tokens"] < 128
    books = counts["categories"]["zh_books"]
    assert books["docs"] == 120 and books["weight"] == 1.5
    web = counts["categories"]["zh_web"]
    assert web["samples"] == web["rows_packed"]  # weight 1.0
    # zh_books at 1.5: each bin of m rows contributes round(1.5 m)
    bins = np.array_split(np.arange(books["rows_packed"]), 3)
    assert books["samples"] == sum(int(np.floor(1.5 * len(b) + 0.5)) for b in bins)
    for k in range(3):  # replay = 20 % of each bucket, to the nearest row
        n_other = sum(counts["categories"][n]["buckets"][k]["samples"] for n in ("zh_web", "zh_books"))
        assert counts["categories"]["en_replay"]["buckets"][k]["samples"] == int(np.floor(0.25 * n_other + 0.5))
    assert counts["replay"]["share_actual"] == pytest.approx(0.2, abs=0.01)
    manifest = json.loads((packed / "stats.json").read_text())
    assert manifest["stage"] == "pack" and manifest["counts"]["docs_in"] == 166


def test_output_is_byte_identical_across_runs_and_thread_counts(packed: Path, shards: dict[str, list[str]],
                                                                tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cptflow.pack", "--tokenizer", str(TOKENIZER), "--output-dir", str(tmp_path / "ds"),
           "--counts", str(tmp_path / "counts.json"), "--params", json.dumps(PARAMS), "--threads", "1", "--shards"]
    # reversed argument order: files are sorted per category, so the order given does not matter
    cmd += [f"{cat}={f}" for cat, files in reversed(shards.items()) for f in reversed(files)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(p.name for p in (packed / "ds").iterdir())
    assert sha256_path(tmp_path / "ds") == sha256_path(packed / "ds")
    assert (tmp_path / "counts.json").read_bytes() == (packed / "counts.json").read_bytes()


def test_tail_drop_and_other_seed(shards: dict[str, list[str]], packed: Path, tmp_path: Path) -> None:
    cfg = from_dict(PackConfig, {**PARAMS, "tail": "drop", "seed": 8})
    run(cfg, TOKENIZER, shards, tmp_path / "ds", tmp_path / "counts.json")
    counts = json.loads((tmp_path / "counts.json").read_text())
    ref = json.loads((packed / "counts.json").read_text())
    for name, c in counts["categories"].items():
        r = ref["categories"][name]
        assert c["padding_tokens"] == 0
        assert c["tail_tokens_dropped"] == (128 - r["padding_tokens"]) % 128
        assert c["rows_packed"] == r["rows_packed"] - (r["padding_tokens"] > 0)
    assert counts["total"]["padding_tokens"] == 0
    assert sha256_path(tmp_path / "ds") != sha256_path(packed / "ds")


def test_bad_shard_names_file_and_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["ok", None]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: row 1: 'text'"):
        run(PackConfig(), TOKENIZER, {"zh": [str(tmp_path / "bad.parquet")]}, tmp_path / "ds", tmp_path / "c.json")
    assert not (tmp_path / "ds").exists()
