"""The global sample order (bucket order kept, seeded shuffle within buckets, disjoint rank shares); prefetching."""

import time

import numpy as np
import pytest
import torch

from cptflow.train import data as train_data

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
    """Rows (ids, real length, first position of the second document, category, bucket) in the packed format."""
    from cptflow.pack.packed import write_dataset

    length = len(rows[0][0])
    starts = np.concatenate([[r * length, r * length + row[2]] for r, row in enumerate(rows)])
    write_dataset(tmp_path / "ds", np.array([r[0] for r in rows]), starts, np.array([r[1] for r in rows]),
                  [r[3] for r in rows], np.array([r[4] for r in rows]))
    return tmp_path / "ds"


def test_open_dataset_and_load_rows(tmp_path):
    rows = [([i, i + 1, i + 2, 0], 3, 2, "zh" if i % 2 else "en", i // 3) for i in range(6)]
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
    # positions restart where the second document starts (2) and at the padding (3)
    assert got["position_ids"].tolist() == [[0, 1, 0, 0], [0, 1, 0, 0]]
    # Targets are labels[1:] that are not padding: 2 per row here; real tokens 3 per row.
    assert train_data.count_targets(got["labels"]) == 4 and train_data.real_tokens(got) == 6


def test_open_dataset_rejects_what_is_not_packed_data(tmp_path):
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="no index.json"):
        train_data.open_dataset(tmp_path / "bad")
    ds_dir = _save(tmp_path, [([1, 2, 3, 4], 4, 2, "zh", 0)] * 2)
    tokens = ds_dir / "shard-00000" / "tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-2])  # one token cut off
    with pytest.raises(ValueError, match=r"tokens.npy: \d+ bytes, the index recorded"):
        train_data.open_dataset(ds_dir)


def fake_read(i):
    """Step i's batch: 2 rows of 4 tokens, the last position of row 1 padding."""
    ids = np.arange(8, dtype=np.int64).reshape(2, 4) + 100 * i
    labels = ids.copy()
    labels[1, -1] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": np.tile(np.arange(4), (2, 1)),
            "ids": np.array([2 * i, 2 * i + 1])}


@pytest.mark.parametrize("depth", [0, 2])
def test_prefetcher_yields_every_step_in_order_with_counts(depth):
    pre = train_data.Prefetcher(fake_read, range(3, 7), depth)
    got = [pre.get() for _ in range(4)]
    pre.close()
    assert [int(b["input_ids"][0, 0]) // 100 for b, _ in got] == [3, 4, 5, 6]
    batch, wait = got[0]
    assert batch["real_tokens"] == 7 and batch["targets"] == 5 and wait >= 0
    assert batch["ids"].tolist() == [6, 7]
    micro = list(train_data.micro_batches(batch, 1, torch.device("cpu")))
    assert len(micro) == 2 and set(micro[0]) == {"input_ids", "position_ids", "labels"}
    assert micro[1]["labels"].tolist() == [[304, 305, 306, -100]]


def test_prefetcher_reads_ahead_and_reports_the_wait():
    def slow(i):
        time.sleep(0.2)
        return fake_read(i)

    pre = train_data.Prefetcher(slow, range(3), depth=2)
    _, first = pre.get()  # nothing read yet: waits ~one read
    time.sleep(1.0)  # the "step": the thread reads the next batches meanwhile
    _, second = pre.get()
    pre.close()
    assert first > 0.1 and second < 0.1
    sync = train_data.Prefetcher(slow, range(1), depth=0)
    assert sync.get()[1] > 0.1 and sync.thread is None  # depth 0: the read happens inside get()


def test_prefetcher_hands_a_read_error_to_the_loop():
    def broken(i):
        if i == 1:
            raise ValueError("data: row 7 is short")
        return fake_read(i)

    pre = train_data.Prefetcher(broken, range(3), depth=2)
    pre.get()
    with pytest.raises(ValueError, match="row 7 is short"):
        pre.get()
    pre.close()
    assert not pre.thread.is_alive()
