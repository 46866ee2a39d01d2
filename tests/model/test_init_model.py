"""cptflow.model.init_model: resize to the expanded tokenizer, padded rows, mean / piece_mean init."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from cptflow.model.bootstrap import BootstrapConfig, build_model
from cptflow.model.hf import copy_tokenizer, load_tokenizer, save_model
from cptflow.model.init_model import InitModelConfig, check_base_ids, expand_matrix, main, run
from cptflow.model.loader import load_causal_lm
from cptflow.model.pieces import piece_groups
from cptflow.model.sizing import model_size, stage_resources
from support.models import expand_byte_level_bpe, run_stage
from cptflow.core.io import sha256_path

DEMO = Path(__file__).resolve().parents[2] / "workflow" / "resources" / "demo"
BASE_TOK = DEMO / "tokenizer"
N_BASE = 32768
# New pieces: Chinese words, a word-initial piece (its "▁" must not enter the mean), a repeated
# character (repeats count), a character outside the base vocabulary (byte-fallback pieces only: the
# mean), the same after a known character (only that character counts), and a
# word-internal English piece, which splits as [ational, ism] without the dummy prefix but as
# [▁at, ional, ism] with it (the Colossal-LLaMA-2 way).
NEW_PIECES = ["中国", "▁中国", "你好", "人民", "学习", "哈哈哈", "𠀀", "中𠀀", "ationalism"]
SPECIAL = "<|im_start|>"


@pytest.fixture(scope="module")
def base_proto() -> sp_pb2.ModelProto:
    m = sp_pb2.ModelProto()
    m.ParseFromString((BASE_TOK / "tokenizer.model").read_bytes())
    return m


@pytest.fixture(scope="module")
def new_tok_dir(tmp_path_factory: pytest.TempPathFactory, base_proto: sp_pb2.ModelProto) -> Path:
    """Base SentencePiece model + appended CJK pieces (scored below every base piece) + one special token."""
    m = sp_pb2.ModelProto()
    m.CopyFrom(base_proto)
    low = m.pieces[-1].score  # the last (lowest-scored) normal piece
    for i, piece in enumerate(NEW_PIECES):
        m.pieces.add(piece=piece, score=low - 1 - i, type=sp_pb2.ModelProto.SentencePiece.NORMAL)
    d = tmp_path_factory.mktemp("newtok")
    (d / "tokenizer.model").write_bytes(m.SerializeToString())
    tok = load_tokenizer(d)
    tok.add_special_tokens({"additional_special_tokens": [SPECIAL]})
    tok.save_pretrained(str(d))
    assert len(load_tokenizer(d)) == N_BASE + len(NEW_PIECES) + 1
    return d


def _base_model(tmp_path_factory: pytest.TempPathFactory, tied: bool) -> Path:
    cfg = BootstrapConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=tied, seed=3)
    model = build_model(cfg, N_BASE, 1, 2)
    d = tmp_path_factory.mktemp("tied" if tied else "untied")
    save_model(model, d)
    copy_tokenizer(BASE_TOK, d)
    return d


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _base_model(tmp_path_factory, tied=True)


@pytest.fixture(scope="module")
def untied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _base_model(tmp_path_factory, tied=False)


def expected_piece_mean(piece: str, old: torch.Tensor, proto: sp_pb2.ModelProto) -> torch.Tensor:
    """Independent reference: sentencepiece itself, dummy prefix off, control/unk, byte-fallback and lone '▁'
    removed; nothing left -> the mean of all base rows."""
    m = sp_pb2.ModelProto()
    m.CopyFrom(proto)
    m.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    ids = [i for i in sp.encode(piece)
           if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) and sp.id_to_piece(i) != "▁"]
    return old[ids].float().mean(dim=0) if ids else old[:N_BASE].float().mean(dim=0)


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("tied", [True, False])
def test_piece_mean_rows_padding_and_manifest(tied: bool, tied_base: Path, untied_base: Path, new_tok_dir: Path,
                                              base_proto: sp_pb2.ModelProto, tmp_path: Path) -> None:
    base = tied_base if tied else untied_base
    rc = main(["--base-model", str(base), "--tokenizer", str(new_tok_dir), "--output-dir", str(tmp_path / "m"),
               "--stats", str(tmp_path / "s.json"), "--params", json.dumps({"method": "piece_mean"})])
    assert rc == 0
    old, new = _weights(base), _weights(tmp_path / "m")
    n_new = N_BASE + len(NEW_PIECES) + 1
    size = 32832  # 32777 rounded up to a multiple of 64
    keys = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert ("lm_head.weight" in new) == (not tied)
    for key in keys:
        e_old, e_new = old[key], new[key]
        assert e_new.shape == (size, 32) and e_new.dtype == torch.float32
        assert torch.equal(e_new[:N_BASE], e_old)  # base rows copied bit for bit
        for j, piece in enumerate(NEW_PIECES):
            torch.testing.assert_close(e_new[N_BASE + j], expected_piece_mean(piece, e_old, base_proto),
                                       rtol=0, atol=1e-7)
        mean = e_old.mean(dim=0)
        torch.testing.assert_close(e_new[n_new - 1], mean, rtol=0, atol=1e-7)  # new special token: mean
        torch.testing.assert_close(e_new[n_new:], mean.expand(size - n_new, 32), rtol=0, atol=1e-7)  # padding
    if not tied:  # lm_head's rows come from lm_head, not from the embedding
        assert not torch.equal(new["lm_head.weight"][N_BASE], new["model.embed_tokens.weight"][N_BASE])
    # "▁中国" and "中国" differ only by the boundary piece, which is excluded: same row.
    assert torch.equal(new[keys[0]][N_BASE], new[keys[0]][N_BASE + 1])
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["vocab_size"] == size and cfg["tie_word_embeddings"] == tied
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == (new_tok_dir / "tokenizer.model").read_bytes()
    assert len(load_tokenizer(tmp_path / "m")) == n_new
    manifest = json.loads((tmp_path / "s.json").read_text())
    c = manifest["counts"]
    assert (c["rows_added"], c["rows_padding"], c["vocab_padded"]) == (len(NEW_PIECES) + 1, size - n_new, size)
    # "𠀀" is only byte-fallback pieces in the base: the mean, like the special token.
    assert (c["rows_mean_fallback"], c["new_special_tokens"]) == (2, 1)
    assert torch.equal(new[keys[0]][N_BASE + NEW_PIECES.index("𠀀")], new[keys[0]][n_new - 1])
    assert manifest["method"] == "piece_mean" and manifest["tied"] == tied


@pytest.mark.parametrize("tied", [True, False])
def test_base_token_logits_equal_the_base_models(tied: bool, tied_base: Path, untied_base: Path,
                                                 new_tok_dir: Path, tmp_path: Path) -> None:
    base = tied_base if tied else untied_base
    run(InitModelConfig(method="piece_mean"), base, new_tok_dir, tmp_path / "m")
    tok = load_tokenizer(BASE_TOK)
    ids = torch.tensor([tok("The Devil's Dictionary, 中文 too: 你好").input_ids])
    with torch.no_grad():
        ref = load_causal_lm(base)(input_ids=ids).logits
        got = load_causal_lm(tmp_path / "m")(input_ids=ids).logits
    assert got.shape[-1] == 32832
    # Exact: every weight the base ids touch is identical, and each logit is the same dot product
    # (the larger lm_head only adds output columns, not terms to any sum).
    assert torch.equal(got[..., :N_BASE], ref)
    if tied:  # and the stage is deterministic: a second run writes the same bytes
        run(InitModelConfig(method="piece_mean"), base, new_tok_dir, tmp_path / "again")
        assert sha256_path(tmp_path / "again") == sha256_path(tmp_path / "m")


def test_mean_method_and_bfloat16(tied_base: Path, new_tok_dir: Path, tmp_path: Path) -> None:
    stats = run(InitModelConfig(method="mean", dtype="bfloat16", pad_to_multiple_of=128), tied_base, new_tok_dir,
                tmp_path / "m")
    old, new = _weights(tied_base)["model.embed_tokens.weight"], _weights(tmp_path / "m")["model.embed_tokens.weight"]
    assert new.dtype == torch.bfloat16 and new.shape == (32896, 32)  # multiple of 128
    assert torch.equal(new[:N_BASE], old.to(torch.bfloat16))
    mean = old.mean(dim=0).to(torch.bfloat16)
    assert torch.equal(new[N_BASE:], mean.expand(32896 - N_BASE, 32))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert stats["rows_mean_fallback"] == len(NEW_PIECES) + 1


def test_refuses_pickled_weights(tmp_path: Path, new_tok_dir: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle"):
        run(InitModelConfig(), tmp_path, new_tok_dir, tmp_path / "out")
    assert main(["--base-model", str(tmp_path), "--tokenizer", str(new_tok_dir), "--output-dir",
                 str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_moved_base_ids_are_refused(tmp_path: Path, base_proto: sp_pb2.ModelProto) -> None:
    m = sp_pb2.ModelProto()
    m.CopyFrom(base_proto)
    m.pieces[1000].piece, m.pieces[1001].piece = m.pieces[1001].piece, m.pieces[1000].piece
    (tmp_path / "tokenizer.model").write_bytes(m.SerializeToString())
    with pytest.raises(ValueError, match="base ids moved: id 1000"):
        check_base_ids(load_tokenizer(BASE_TOK), load_tokenizer(tmp_path))


def test_70k_vocabulary_init_is_fast_and_exact() -> None:
    """Synthetic 32768 -> 70000 rows (hidden 256), ~3 pieces per new token: one index_add_, well under 2 s."""
    rng = np.random.default_rng(0)
    n_old, n_new, hidden = N_BASE, 70000, 256
    old = torch.from_numpy(rng.standard_normal((n_old, hidden), dtype=np.float32))
    lens = rng.integers(0, 5, n_new - n_old)  # some tokens get no piece -> mean
    rows = np.repeat(np.arange(n_new - n_old), lens)
    cols = rng.integers(0, n_old, len(rows))
    t = time.perf_counter()
    out = expand_matrix(old, n_old, n_new, 70016, rows, cols)
    seconds = time.perf_counter() - t
    assert seconds < 2.0, seconds
    assert out.shape == (70016, hidden) and torch.equal(out[:n_old], old)
    starts = np.concatenate([[0], np.cumsum(lens)])
    for j in (0, 1, 2, 1000, n_new - n_old - 1):
        ids = cols[starts[j]: starts[j + 1]]
        want = old[ids].mean(dim=0) if len(ids) else old.mean(dim=0)
        torch.testing.assert_close(out[n_old + j], want, rtol=0, atol=1e-5)


def test_piece_groups_same_for_prepend_normaliser_tokenizers(new_tok_dir: Path, tmp_path: Path) -> None:
    """cptflow writes tokenizer.json with the dummy prefix as a Prepend normaliser, transformers'
    conversion as a Metaspace pre-tokenizer: both must be split without the prefix."""
    meta = load_tokenizer(BASE_TOK)
    spec = json.loads(meta.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((BASE_TOK / name).read_bytes())
    norm = load_tokenizer(tmp_path)
    text = "Hello  world, 中国人"
    assert norm(text).input_ids == meta(text).input_ids
    new = load_tokenizer(new_tok_dir)
    rows_m, cols_m, _ = piece_groups(meta, new)
    rows_n, cols_n, _ = piece_groups(norm, new)
    assert np.array_equal(rows_m, rows_n) and np.array_equal(cols_m, cols_n)
    assert meta.convert_tokens_to_ids("▁") not in cols_m.tolist()


# ---- byte-level BPE and the real model (SmolLM2-135M, taken in once per session) -------------------------
WORDS = ["中国", "中国人", "人民", "学习", "你好"]


@pytest.fixture(scope="module")
def smol_expanded(smollm2, tmp_path_factory) -> dict:
    """SmolLM2's tokenizer with merges appended for a few Chinese words, one added token, and the init run."""
    root = tmp_path_factory.mktemp("smol_init")
    new = expand_byte_level_bpe(smollm2["base"], root / "tok", WORDS)
    tok = load_tokenizer(root / "tok")
    tok.add_tokens(["你好世界"])  # the naive add_tokens route: plain text, not a BPE entry
    tok.save_pretrained(str(root / "tok"))
    run_stage("cptflow.model.init_model", "--base-model", str(smollm2["base"]), "--tokenizer", str(root / "tok"),
              "--output-dir", str(root / "init"), "--stats", str(root / "init.stats.json"))
    return {"new": new, "tok": root / "tok", "init": root / "init",
            "manifest": json.loads((root / "init.stats.json").read_text())}


def test_byte_level_bpe_rows_are_means_of_their_base_tokenization(smollm2, smol_expanded):
    base_tok, new_tok = load_tokenizer(smollm2["base"]), load_tokenizer(smol_expanded["tok"])
    n_base = len(base_tok)
    emb = _weights(smollm2["base"])["model.embed_tokens.weight"]
    got = _weights(smol_expanded["init"])["model.embed_tokens.weight"]
    assert torch.equal(got[:n_base], emb)
    for j, piece in enumerate(smol_expanded["new"] + ["你好世界"]):
        i = n_base + j
        assert new_tok.convert_ids_to_tokens(i) == piece
        text = new_tok.decode([i])
        if "\ufffd" in text:  # part of a UTF-8 character: the base tokens its bytes are made of
            ids = _byte_split(base_tok, piece)
        else:  # whole characters: what the base tokenizer makes of the text (independent of our code path)
            ids = base_tok(text, add_special_tokens=False).input_ids
        torch.testing.assert_close(got[i], emb[ids].mean(dim=0), rtol=0, atol=1e-6)
    m = smol_expanded["manifest"]
    assert m["byte_level_bpe"] is True and m["counts"]["rows_mean_fallback"] == 0
    assert m["peak_rss_mb"] <= stage_resources("init_model", model_size(smollm2["base"]))["mem_mb"]
    assert m["counts"]["rows_added"] == len(smol_expanded["new"]) + 1
    assert json.loads((smol_expanded["init"] / "config.json").read_text())["cptflow_base_vocab_size"] == n_base


def _byte_split(base_tok, piece: str) -> list[int]:
    """Longest base tokens covering ``piece`` left to right (each new token here joins base tokens)."""
    vocab, ids, k = base_tok.get_vocab(), [], 0
    while k < len(piece):
        end = max(e for e in range(k + 1, len(piece) + 1) if piece[k:e] in vocab)
        ids.append(vocab[piece[k:end]])
        k = end
    return ids


def test_base_token_logits_of_the_real_model_are_unchanged(smollm2, smol_expanded):
    """The invariant on SmolLM2-135M itself: for base-token inputs, logits over base ids equal the base's."""
    tok = load_tokenizer(smollm2["base"])
    n_base = len(tok)
    ids = torch.tensor([tok("The Devil's Dictionary, 1911. 中国人民 学习 你好世界!").input_ids])
    with torch.no_grad():
        ref = load_causal_lm(smollm2["base"])(input_ids=ids).logits
        new = load_causal_lm(smol_expanded["init"])
        got = new(input_ids=ids).logits
    assert new.lm_head.weight is new.model.embed_tokens.weight  # still tied
    assert got.shape[-1] == 49216  # 49152 + 10 new, padded to a multiple of 64
    assert torch.equal(got[..., :n_base], ref)


def test_no_new_tokens_passes_the_base_through(tied_base, tmp_path):
    """vocab.method none: the same tokenizer in, the base's own files out (no padding, no rewrite)."""
    stats = run(InitModelConfig(), tied_base, tied_base, tmp_path / "m", tmp_path / "s.json")
    assert stats["rows_added"] == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (tied_base / name).read_bytes(), name
    assert json.loads((tmp_path / "s.json").read_text())["passed_through"] is True
    # another dtype is a real conversion, still without padding or new rows
    run(InitModelConfig(dtype="bfloat16"), tied_base, tied_base, tmp_path / "bf16")
    w = _weights(tmp_path / "bf16")["model.embed_tokens.weight"]
    assert w.dtype == torch.bfloat16 and w.shape[0] == N_BASE
