"""cptflow.pack.pack_shard: splicing into rows on disk, derived positions/labels, 2- or 4-byte ids, bad shards."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from cptflow.core.io import sha256_path
from cptflow.model.hf import load_tokenizer
from cptflow.pack import encoder
from cptflow.pack.encoder import load_encoder
from cptflow.pack.pack_config import PackConfig
from cptflow.pack.pack_shard import main, run
from cptflow.pack.packed import read_meta, token_dtype, write_dataset, write_index
from cptflow.pack.packed_reader import PackedData
from cptflow.pack.splice import ShardWriter, encoded_batches, read_batches, tokenize

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "workflow" / "resources" / "demo"
TOKENIZER = DEMO / "tokenizer"
BOS, EOS, PAD = 1, 2, 0


def _encoder(out: Path, tokenizer: Path = TOKENIZER, cfg: PackConfig = PackConfig()) -> Path:
    """The run's encoder (pack_encoder) of ``tokenizer`` for the special-token settings of ``cfg``."""
    encoder.run(cfg, tokenizer, out)
    return out


def _docs(*lens: int) -> list[np.ndarray]:
    """Synthetic documents whose tokens (>= 10) say which document they come from: doc i, token 10*(i+1)+k."""
    return [np.arange(n, dtype=np.int32) % 9 + 10 * (i + 1) for i, n in enumerate(lens)]


def rows_of(shard: Path) -> dict[str, np.ndarray]:
    """Every row of one shard as training reads it (through an index in row order)."""
    meta = read_meta(shard)
    n = meta["rows"]
    write_index(shard.parent / "idx", [{"path": f"../{shard.name}", "rows": n, "category": "c",
                                        "tokens_bytes": (shard / "tokens.npy").stat().st_size, "tokens_sha256": ""}],
                ["c"], meta["max_length"], meta["dtype"], np.zeros(n), np.arange(n), np.zeros(n), np.zeros(n))
    return PackedData(shard.parent / "idx").take(np.arange(n))


def splice(tmp: Path, docs: list[np.ndarray], max_length: int, tail: str, bos=BOS, eos=EOS) -> tuple[dict, dict]:
    w = ShardWriter(tmp / "shard", max_length, np.dtype(np.uint16), PAD, tail, bos, eos)
    w.add(docs[:1])
    w.add(docs[1:])  # batches continue one stream
    counts = w.finish({})
    return rows_of(tmp / "shard"), counts


def test_splice_boundaries_positions_and_split_documents(tmp_path: Path) -> None:
    got, c = splice(tmp_path, _docs(3, 5, 12), 8, "pad")
    # stream: [B 10 11 12 E][B 20..24 E][B 30..38 30 31 32 E] = 5 + 7 + 14 = 26 tokens -> 3 rows + 6 padded
    assert got["input_ids"].tolist() == [
        [1, 10, 11, 12, 2, 1, 20, 21],
        [22, 23, 24, 2, 1, 30, 31, 32],
        [33, 34, 35, 36, 37, 38, 30, 31],
        [32, 2, 0, 0, 0, 0, 0, 0],
    ]
    assert got["position_ids"].tolist() == [
        [0, 1, 2, 3, 4, 0, 1, 2],
        [0, 1, 2, 3, 0, 1, 2, 3],  # doc 2 continues: restarts at 0 at the row start; doc 3 starts at 0
        [0, 1, 2, 3, 4, 5, 6, 7],
        [0, 1, 0, 1, 2, 3, 4, 5],  # padding is its own segment
    ]
    assert got["labels"][3].tolist() == [32, 2] + [-100] * 6 and (got["labels"][:3] == got["input_ids"][:3]).all()
    assert got["real"].tolist() == [8, 8, 8, 2]
    assert (c["docs"], c["doc_tokens"], c["stream_tokens"], c["docs_split"]) == (3, 20, 26, 2)
    assert (c["rows_packed"], c["padding_tokens"], c["tail_tokens_dropped"]) == (4, 6, 0)
    starts = np.load(tmp_path / "shard" / "starts.npy")
    assert starts.tolist() == [0, 5, 12] and starts.dtype == np.uint32  # 4 bytes per document


def test_tail_drop_and_no_bos_eos(tmp_path: Path) -> None:
    got, c = splice(tmp_path / "a", _docs(3, 5, 12), 8, "drop")
    assert got["input_ids"].shape == (3, 8) and got["real"].tolist() == [8, 8, 8]
    assert (c["tail_tokens_dropped"], c["padding_tokens"]) == (2, 0)
    assert np.load(tmp_path / "a" / "shard" / "tokens.npy").shape == (24,)  # truncated on disk
    q, _ = splice(tmp_path / "b", _docs(3, 5), 4, "drop", None, None)
    assert q["input_ids"].tolist() == [[10, 11, 12, 20], [21, 22, 23, 24]]
    assert q["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]
    exact, c = splice(tmp_path / "c", _docs(6), 4, "pad")
    assert c["padding_tokens"] == 0 and exact["input_ids"].shape == (2, 4)


def test_token_ids_take_two_bytes_up_to_id_65535() -> None:
    assert token_dtype(65535) == np.uint16  # a vocabulary of 65,536 ids: 0..65535
    assert token_dtype(65536) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(2**32)


def _word_tokenizer(path: Path, n: int) -> Path:
    """A real fast tokenizer whose ids reach n - 1 (word i = 'w<i>'; <s>, </s> at 0, 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, n)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(str(path))
    return path


@pytest.mark.parametrize("n_ids,dtype", [(65536, "uint16"), (65537, "uint32")])
def test_largest_ids_survive_at_the_uint16_boundary(tmp_path: Path, n_ids: int, dtype: str) -> None:
    tok = _word_tokenizer(tmp_path / "tok", n_ids)
    top = n_ids - 1
    pq.write_table(pa.table({"text": [f"w{top} w2 w{top - 1}", f"w{top}"]}), tmp_path / "s.parquet")
    cfg = PackConfig(max_length=4)
    run(cfg, _encoder(tmp_path / "enc", tok, cfg), tmp_path / "s.parquet", "c", tmp_path / "shard")
    assert read_meta(tmp_path / "shard")["dtype"] == dtype
    got = rows_of(tmp_path / "shard")
    assert got["input_ids"].reshape(-1)[:8].tolist() == [0, top, 2, top - 1, 1, 0, top, 1]


def test_tokenize_matches_sentencepiece(tmp_path: Path) -> None:
    texts = [json.loads(line)["text"][:2000] for line in
             (DEMO / "corpus" / "zh_web" / "cmrc2018_dev.jsonl").read_text(encoding="utf-8").splitlines()[:20]]
    texts += ["The Devil's Dictionary", "", "混合 text 与 123", "literal </s> and <s> stay text"]
    got = tokenize(load_encoder(_encoder(tmp_path / "enc"))[0], texts, batch_docs=7)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "tokenizer.model"))
    assert [g.tolist() for g in got] == sp.encode(texts)
    assert 1 not in got[-1] and 2 not in got[-1]  # special tokens in raw text are not parsed as BOS/EOS


def test_batches_encoded_ahead_are_the_plain_loop_and_a_bad_row_still_names_itself(tmp_path: Path) -> None:
    import threading

    texts = [json.loads(line)["text"] for line in
             (DEMO / "corpus" / "zh_books" / "tang300.jsonl").read_text(encoding="utf-8").splitlines()[:40]]
    backend = load_encoder(_encoder(tmp_path / "enc"))[0]
    shard = _shard(tmp_path / "s.parquet", texts)
    plain = [(t, tokenize(backend, t, 6)) for t in read_batches(shard, 6)]
    ahead = list(encoded_batches(backend, shard, 6))
    assert [t for t, _ in ahead] == [t for t, _ in plain] and len(ahead) == 7
    assert [[d.tolist() for d in ds] for _, ds in ahead] == [[d.tolist() for d in ds] for _, ds in plain]
    first = encoded_batches(backend, shard, 6)
    next(first)
    first.close()  # a caller that stops early leaves no thread behind
    assert not any(t.name == "cptflow-pack-encode" and t.is_alive() for t in threading.enumerate())
    got = []
    with pytest.raises(ValueError, match=r"bad.parquet: row 13: 'text'"):
        for batch, _ in encoded_batches(backend, _shard(tmp_path / "bad.parquet", texts[:13] + [None]), 6):
            got.append(len(batch))
    assert got == [6, 6]  # the batches before the bad one came through, in order


def _shard(path: Path, texts: list) -> Path:
    pq.write_table(pa.table({"id": [f"d:{i}" for i in range(len(texts))], "text": texts}), path)
    return path


def test_shard_on_disk_is_the_tokenized_stream_byte_identical_at_any_thread_count(tmp_path: Path) -> None:
    texts = [json.loads(line)["text"] for line in
             (DEMO / "corpus" / "zh_books" / "tang300.jsonl").read_text(encoding="utf-8").splitlines()[:50]]
    shard = _shard(tmp_path / "s.parquet", texts + [""])
    params = json.dumps({"max_length": 64, "batch_docs": 7})
    base = ["--encoder", str(_encoder(tmp_path / "enc")), "--input", str(shard), "--category", "zh_books", "--params", params]
    assert main([*base, "--output-dir", str(tmp_path / "a"), "--stats", str(tmp_path / "a.stats.json")]) == 0
    subprocess.run([sys.executable, "-m", "cptflow.pack.pack_shard", *base, "--output-dir", str(tmp_path / "b"),
                    "--threads", "1"], check=True, cwd=ROOT, capture_output=True)
    assert sha256_path(tmp_path / "a") == sha256_path(tmp_path / "b")
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "tokenizer.model"))
    stream = np.concatenate([[1, *ids, 2] for ids in sp.encode(texts)])
    tokens = np.load(tmp_path / "a" / "tokens.npy")
    assert tokens.dtype == np.uint16  # the demo's 32,768 ids
    assert tokens[:len(stream)].tolist() == stream.tolist() and len(tokens) == -(-len(stream) // 64) * 64
    m = json.loads((tmp_path / "a.stats.json").read_text())
    assert m["counts"]["docs_in"] == 51 and m["counts"]["docs_out"] == 50 and m["counts"]["dropped/pack_empty"] == 1
    assert m["peak_rss_mb"] > 0 and set(Path(k).name for k in m["outputs"]) == {
        "meta.json", "real.npy", "starts.npy", "tokens.npy"}


def test_empty_shard_gives_zero_rows_and_a_null_text_names_its_row(tmp_path: Path) -> None:
    enc = _encoder(tmp_path / "enc")
    run(PackConfig(max_length=16), enc, _shard(tmp_path / "e.parquet", []), "c", tmp_path / "empty")
    assert read_meta(tmp_path / "empty")["rows"] == 0 and np.load(tmp_path / "empty" / "tokens.npy").shape == (0,)
    with pytest.raises(ValueError, match=r"bad.parquet: row 1: 'text'"):
        run(PackConfig(), enc, _shard(tmp_path / "bad.parquet", ["ok", None]), "c", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_10_mb_document_is_split_over_rows(tmp_path: Path) -> None:
    line = (DEMO / "corpus" / "zh_web" / "cmrc2018_dev.jsonl").read_text(encoding="utf-8").splitlines()[0]
    para = json.loads(line)["text"]
    big = (para * (10_000_000 // len(para.encode()) + 1))[: 10_000_000 // 3]  # ~10 MB of UTF-8
    shard = _shard(tmp_path / "big.parquet", ["short one", big, "after"])
    code = ("import resource, sys; from cptflow.pack.pack_shard import main; "
            "rc = main(sys.argv[1:]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--encoder", str(_encoder(tmp_path / "enc")), "--input", str(shard),
                           "--category", "zh", "--output-dir", str(tmp_path / "out"), "--stats",
                           str(tmp_path / "out.stats.json"), "--params", json.dumps({"max_length": 2048})],
                          check=True, cwd=ROOT, capture_output=True, text=True)
    c = read_meta(tmp_path / "out")["counts"]
    enc = load_tokenizer(TOKENIZER).backend_tokenizer
    n = [len(enc.encode(t, add_special_tokens=False).ids) for t in ("short one", big, "after")]
    assert c["docs"] == 3 and c["stream_tokens"] == sum(n) + 2 * 3 and c["docs_split"] >= 1
    assert c["rows_packed"] == -(-c["stream_tokens"] // 2048) and n[1] > 1_000_000
    assert np.load(tmp_path / "out" / "starts.npy").tolist() == [0, n[0] + 2, n[0] + n[1] + 4]
    assert int(proc.stdout.split()[-1]) < 2000  # MB of peak RSS: the one document's encoding, no more


def test_write_dataset_carries_a_loss_mask(tmp_path: Path) -> None:
    """SFT's rows (whole conversations, padded per row) with a target mask, as training reads them."""
    ids = np.array([[5, 6, 7, 8, 9, 0], [11, 12, 13, 14, 0, 0]])
    mask = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0]])
    write_dataset(tmp_path / "sft", ids, np.array([0, 3, 6]), np.array([5, 4]), ["sft", "sft"], np.zeros(2), mask)
    got = PackedData(tmp_path / "sft").take(np.array([1, 0]))
    assert got["labels"].tolist() == [[-100, -100, 13, 14, -100, -100], [-100, 6, 7, -100, 9, -100]]
    assert got["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 0]]
    assert got["real"].tolist() == [4, 5]
