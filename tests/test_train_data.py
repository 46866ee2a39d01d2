"""The global sample order: bucket order kept, seeded shuffle within buckets, disjoint rank shares."""

import numpy as np
import pyarrow as pa
import pytest

from cptflow import train_data

BUCKETS = np.array([0] * 6 + [1] * 5 + [2] * 4)
NAMES = ["zh", "en", "code"]
CODES = np.array([0, 1, 2] * 5)  # dictionary-encoded categories: zh, en, code, zh, ...


def test_select_rows_by_category_and_bucket():
    assert train_data.select_rows(CODES, NAMES, BUCKETS, None, None).tolist() == list(range(15))
    zh = train_data.select_rows(CODES, NAMES, BUCKETS, ["zh"], None)
    assert zh.tolist() == [0, 3, 6, 9, 12]
    assert train_data.select_rows(CODES, NAMES, BUCKETS, ["zh", "en"], [1]).tolist() == [6, 7, 9, 10]


def test_select_rows_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"categories \['fr'\] not in the data"):
        train_data.select_rows(CODES, NAMES, BUCKETS, ["fr"], None, "d")
    with pytest.raises(ValueError, match=r"buckets \[7\]"):
        train_data.select_rows(CODES, NAMES, BUCKETS, None, [7], "d")
    with pytest.raises(ValueError, match="d: row 3: bucket 0 after bucket 1"):
        train_data.select_rows(np.zeros(4), ["a"], np.array([0, 0, 1, 0]), None, None, "d")


def test_order_keeps_buckets_and_shuffles_within():
    order = train_data.SampleOrder(np.arange(15), BUCKETS, seed=1)
    ep = order.epoch_order(0)
    assert sorted(ep.tolist()) == list(range(15))
    assert BUCKETS[ep].tolist() == sorted(BUCKETS.tolist())  # bucket 0 first, then 1, then 2
    assert ep[:6].tolist() != list(range(6))  # shuffled within bucket 0 (seed 1)
    again = train_data.SampleOrder(np.arange(15), BUCKETS, seed=1).epoch_order(0)
    assert again.tolist() == ep.tolist()  # deterministic
    other = train_data.SampleOrder(np.arange(15), BUCKETS, seed=2).epoch_order(0)
    assert other.tolist() != ep.tolist()


def test_ids_wrap_into_a_reshuffled_next_epoch():
    order = train_data.SampleOrder(np.arange(15), BUCKETS, seed=3)
    ids = order.ids(10, 10)  # positions 10..19: five of epoch 0, five of epoch 1
    assert ids[:5].tolist() == order.epoch_order(0)[10:].tolist()
    assert ids[5:].tolist() == order.epoch_order(1)[:5].tolist()
    assert BUCKETS[ids[5:]].tolist() == [0] * 5  # the new pass starts at bucket 0 again


def test_rank_shares_are_disjoint_and_cover_the_global_batch():
    order = train_data.SampleOrder(np.arange(15), BUCKETS, seed=0)
    g = order.ids(4, 8)
    for world in (1, 2, 4):
        shares = [train_data.rank_share(g, r, world) for r in range(world)]
        flat = np.concatenate(shares)
        assert sorted(flat.tolist()) == sorted(g.tolist())
        assert len(set(flat.tolist())) == 8
    assert train_data.rank_share(g, 1, 2).tolist() == g[1::2].tolist()
    with pytest.raises(ValueError, match="not divisible"):
        train_data.rank_share(g, 0, 3)


def _save(tmp_path, rows):
    import datasets

    t = pa.table({
        "input_ids": pa.array([r[0] for r in rows], type=pa.list_(pa.int32())),
        "labels": pa.array([r[1] for r in rows], type=pa.list_(pa.int32())),
        "position_ids": pa.array([r[2] for r in rows], type=pa.list_(pa.int32())),
        "category": pa.array([r[3] for r in rows]),
        "bucket": pa.array([r[4] for r in rows], type=pa.int32()),
    })
    datasets.Dataset(t).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_open_dataset_and_load_rows(tmp_path):
    rows = [([i, i + 1, i + 2, 0], [i, i + 1, i + 2, -100], [0, 1, 0, 0], "zh" if i % 2 else "en", i // 3)
            for i in range(6)]
    ds, length = train_data.open_dataset(_save(tmp_path, rows))
    assert length == 4
    codes, names, buckets = train_data.index_columns(ds)
    assert [names[c] for c in codes] == ["en", "zh"] * 3 and buckets.tolist() == [0, 0, 0, 1, 1, 1]
    zh = train_data.select_rows(codes, names, buckets, ["zh"], None)
    assert zh.tolist() == [1, 3, 5]
    got = train_data.load_rows(ds, np.array([4, 1]), length)
    assert got["input_ids"].dtype == np.int64
    assert got["input_ids"].tolist() == [[4, 5, 6, 0], [1, 2, 3, 0]]
    assert got["labels"][:, -1].tolist() == [-100, -100]
    # Targets are labels[1:] that are not padding: 2 per row here.
    assert train_data.count_targets(got["labels"]) == 4


def test_open_dataset_rejects_missing_columns(tmp_path):
    import datasets

    datasets.Dataset(pa.table({"input_ids": pa.array([[1, 2]])})).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="missing column"):
        train_data.open_dataset(tmp_path / "bad")
