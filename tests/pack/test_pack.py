"""cptflow.pack.pack (the layout step): buckets, weights, replay share, an index over the shards, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cptflow.core.config import ConfigError, from_dict
from cptflow.core.io import sha256_path, size_path
from cptflow.pack import encoder, pack_shard
from cptflow.pack.buckets import plan_buckets, resolve_weights
from cptflow.pack.pack import PackConfig, main, run
from cptflow.train import data as train_data

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "workflow" / "resources" / "demo"
TOKENIZER = DEMO / "tokenizer"
PARAMS = {"max_length": 128, "num_bins": 3, "seed": 7, "categories": {"zh_web": 1.0, "zh_books": 1.5},
          "replay": {"category": "en_replay", "share": 0.2}}


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


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Packed shards (pack_shard, with manifests) of demo corpus slices, two files for zh_books, one empty file."""
    d = tmp_path_factory.mktemp("shards")
    spec = [("zh_web", "cmrc2018_dev", 40), ("zh_books", "tang300", 60), ("zh_books", "song300", 60),
            ("en_replay", "devils_dictionary", 6), ("zh_web", "empty", 0)]
    out = []
    enc = d / "encoder"
    encoder.run(from_dict(PackConfig, PARAMS), TOKENIZER, enc)
    for cat, name, n in spec:
        src = DEMO / "corpus" / cat / f"{name}.jsonl"
        texts = [json.loads(x)["text"] for x in src.read_text(encoding="utf-8").splitlines()[:n]] if n else []
        pq.write_table(pa.table({"id": [f"{name}:{i}" for i in range(n)], "text": pa.array(texts, pa.string())}),
                       d / f"{name}.parquet")
        pack_shard.run(from_dict(PackConfig, PARAMS), enc, d / f"{name}.parquet", cat, d / "packed" / name,
                       d / "packed" / f"{name}.stats.json")
        out.append(d / "packed" / name)
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, shards: list[Path]) -> Path:
    out = tmp_path_factory.mktemp("packed")
    argv = ["--output-dir", str(out / "data"), "--counts", str(out / "counts.json"), "--stats", str(out / "stats.json"),
            "--params", json.dumps(PARAMS), "--shards", *map(str, shards)]
    assert main(argv) == 0
    return out


def _all(out: Path) -> tuple[dict, np.ndarray, list[str], np.ndarray]:
    ds, length = train_data.open_dataset(out / "data")
    codes, names, buckets = train_data.index_columns(ds)
    return train_data.load_rows(ds, np.arange(ds.n), length), codes, names, buckets


def test_samples_come_in_bucket_order_and_every_bucket_mixes_every_category(packed: Path) -> None:
    rows, codes, names, buckets = _all(packed)
    assert buckets[0] == 0 and np.all(np.diff(buckets) >= 0) and set(buckets.tolist()) == {0, 1, 2}
    cats = np.array(names)[codes]
    for k in range(3):
        assert set(cats[buckets == k]) == {"zh_web", "zh_books", "en_replay"}
    ids, labels, pos = rows["input_ids"], rows["labels"], rows["position_ids"]
    pad = labels == -100
    assert (labels[~pad] == ids[~pad]).all()
    starts = (pos == 0) & ~pad  # a document starts (position 0 after the row start) exactly where a BOS is
    assert (starts[:, 1:] == ((ids == 1) & ~pad)[:, 1:]).all()
    assert np.all(ids[:, 1:][(ids[:, :-1] == 2) & ~pad[:, 1:]] == 1)  # EOS is followed by BOS (or padding)
    assert int(np.all(pos[:, 1:] == pos[:, :-1] + 1, axis=1).sum()) > 0  # some rows are inside one document


def test_counts_match_the_samples(packed: Path) -> None:
    rows, codes, names, buckets = _all(packed)
    counts = json.loads((packed / "counts.json").read_text())
    labels = rows["labels"]
    assert counts["total"]["samples"] == len(labels)
    assert counts["total"]["tokens"] == int((labels != -100).sum()) == int(rows["real"].sum())
    assert counts["total"]["padding_tokens"] == int((labels == -100).sum())
    cats = np.array(names)[codes]
    for name, c in counts["categories"].items():
        assert [b["samples"] for b in c["buckets"]] == [int(np.sum((cats == name) & (buckets == k))) for k in range(3)]
        assert c["tail_tokens_dropped"] == 0 and c["padding_tokens"] < 128 * c["shards"]
    books = counts["categories"]["zh_books"]
    assert books["docs"] == 120 and books["weight"] == 1.5 and books["shards"] == 2
    web = counts["categories"]["zh_web"]
    assert web["samples"] == web["rows_packed"] and web["shards"] == 2  # weight 1.0; the empty shard counted
    bins = np.array_split(np.arange(books["rows_packed"]), 3)  # zh_books at 1.5: each bin of m rows gives round(1.5 m)
    assert books["samples"] == sum(int(np.floor(1.5 * len(b) + 0.5)) for b in bins)
    for k in range(3):  # replay = 20 % of each bucket, to the nearest row
        n_other = sum(counts["categories"][n]["buckets"][k]["samples"] for n in ("zh_web", "zh_books"))
        assert counts["categories"]["en_replay"]["buckets"][k]["samples"] == int(np.floor(0.25 * n_other + 0.5))
    assert counts["replay"]["share_actual"] == pytest.approx(0.2, abs=0.01)
    manifest = json.loads((packed / "stats.json").read_text())
    assert manifest["stage"] == "pack" and manifest["counts"]["shards_empty"] == 1


def test_the_index_copies_no_token_and_survives_a_move(packed: Path, shards: list[Path], tmp_path: Path) -> None:
    tokens = sum(size_path(s / "tokens.npy") for s in shards)
    counts = json.loads((packed / "counts.json").read_text())
    assert size_path(packed / "data") < 16 * counts["total"]["samples"] + 8192  # ~14 bytes per sample + index.json
    rows = sum(c["rows_packed"] for c in counts["categories"].values())
    assert tokens == 2 * 128 * rows + 128 * len(shards)  # uint16 ids, and a 128-byte .npy header per shard
    moved = tmp_path / "run"  # the index and the shards moved elsewhere together
    shutil.copytree(shards[0].parents[1], moved / shards[0].parents[1].name)
    shutil.copytree(packed, moved / packed.name)
    before = _all(packed)[0]["input_ids"]
    index = json.loads((packed / "data" / "index.json").read_text())
    assert all(not Path(s["path"]).is_absolute() for s in index["shards"])
    assert (_all(moved / packed.name)[0]["input_ids"] == before).all()


def test_output_is_byte_identical_whatever_the_shard_order(packed: Path, shards: list[Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cptflow.pack.pack", "--output-dir", str(tmp_path / "data"), "--counts",
           str(tmp_path / "counts.json"), "--params", json.dumps(PARAMS), "--shards", *map(str, reversed(shards))]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    assert sha256_path(tmp_path / "data") == sha256_path(packed / "data")
    assert (tmp_path / "counts.json").read_bytes() == (packed / "counts.json").read_bytes()


def test_the_layout_a_few_samples_at_a_time_is_the_same(packed: Path, shards: list[Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout maps samples to (shard, row) and tallies counts in chunks (bounded temporaries at 10^8 samples);
    chunks of 5 samples, each holding some categories and not others, give the same bytes as one chunk."""
    from cptflow.pack import pack as layout

    counts = json.loads((packed / "counts.json").read_text())
    assert counts["total"]["samples"] > 10 * 5
    monkeypatch.setattr(layout, "CHUNK", 5)
    run(from_dict(PackConfig, PARAMS), shards, tmp_path / "data", tmp_path / "counts.json")
    assert sha256_path(tmp_path / "data") == sha256_path(packed / "data")
    assert (tmp_path / "counts.json").read_bytes() == (packed / "counts.json").read_bytes()


def test_another_seed_gives_another_order_and_a_length_mismatch_is_refused(shards: list[Path], packed: Path,
                                                                              tmp_path: Path) -> None:
    run(from_dict(PackConfig, {**PARAMS, "seed": 8}), shards, tmp_path / "data", tmp_path / "counts.json")
    assert sha256_path(tmp_path / "data") != sha256_path(packed / "data")
    other, ref = (json.loads(p.read_text())["total"] for p in (tmp_path / "counts.json", packed / "counts.json"))
    assert other["samples"] == ref["samples"]  # as many samples (bin sizes), other rows drawn and another order
    with pytest.raises(ValueError, match="rows of 128 tokens, but pack.max_length is 64"):
        run(from_dict(PackConfig, {**PARAMS, "max_length": 64}), shards, tmp_path / "d2", tmp_path / "c2.json")


def test_a_trained_category_left_empty_fails_naming_it(shards: list[Path], tmp_path: Path) -> None:
    only_empty = [s for s in shards if s.name != "cmrc2018_dev"]  # zh_web is left with its empty file
    with pytest.raises(ValueError, match="category 'zh_web' ended with 0 documents"):
        run(from_dict(PackConfig, PARAMS), only_empty, tmp_path / "data", tmp_path / "counts.json")
    zero = {**PARAMS, "categories": {"zh_web": 0.0, "zh_books": 1.5}}  # weight 0: not trained on, so fine
    run(from_dict(PackConfig, zero), only_empty, tmp_path / "data", tmp_path / "counts.json")
    assert json.loads((tmp_path / "counts.json").read_text())["categories"]["zh_web"]["samples"] == 0


def test_a_changed_shard_is_refused(shards: list[Path], tmp_path: Path) -> None:
    copy = tmp_path / "packed"
    shutil.copytree(shards[0].parent, copy)
    tokens = copy / shards[0].name / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-256])
    with pytest.raises(ValueError, match="tokens.npy: .* bytes, but .* recorded"):
        run(from_dict(PackConfig, PARAMS), [copy / s.name for s in shards], tmp_path / "data", tmp_path / "c.json")
