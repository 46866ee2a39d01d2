"""Bits per character: window scheme scores every token once; numbers equal an independent computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from conftest import tiny_llama
from cptflow.eval import bpc

DEMO = Path(__file__).resolve().parents[2] / "workflow/resources/demo"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO / "tokenizer")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=1, heads=2, kv_heads=2, max_positions=256, lm_head_scale=30)


@pytest.mark.parametrize("n,window,stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (37, 8, 3), (37, 100, 50), (9, 8, 8)])
def test_every_token_scored_once_with_bounded_windows(n, window, stride):
    scored = []
    for i, (b, e, k) in enumerate(bpc.spans(n, window, stride)):
        assert e - 1 - b <= window  # inputs per window
        assert 1 <= k <= e - b - 1 + (b == 0)
        if i:
            assert e - k - b >= window - stride + 1  # context of the first new target
        scored += range(e - k, e)
    assert scored == list(range(1, n))


def test_stride_larger_than_window_is_refused():
    with pytest.raises(ValueError, match="stride 5 must be between 1 and the window 4"):
        bpc.spans(10, 4, 5)


def texts() -> list[str]:
    zh = bpc.read_texts(DEMO / "heldout/zh_modern.jsonl", max_docs=2)
    en = bpc.read_texts(DEMO / "heldout/en.jsonl", max_docs=1)
    return [zh[0][:60], zh[1][:25], en[0][:120]]


def test_bpc_equals_independent_nll_in_one_window(model, tok):
    """Documents shorter than the window: one forward each from BOS gives the same bits."""
    docs = texts()
    res = bpc.bits_per_char(model, tok, docs, window=256, stride=128, batch_size=2, pad_id=0)
    nats, tokens = 0.0, 0
    for text in docs:
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        nats -= float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        tokens += len(ids) - 1
    chars = sum(len(t) for t in docs)
    assert res["chars"] == chars and res["tokens"] == tokens == res["scored_tokens"]
    assert res["bits"] == pytest.approx(nats / math.log(2), rel=1e-5)
    assert res["bpc"] == pytest.approx(nats / math.log(2) / chars, rel=1e-5)
    assert res["tokens_per_char"] == pytest.approx(tokens / chars, abs=1e-6)


def test_bpc_chunked_windows_match_per_token_reference(model, tok):
    """stride == window: target j is predicted from tokens ((j-1)//W)*W .. j-1 — checked one forward per token."""
    text = texts()[2][:80]
    w = 8
    res = bpc.bits_per_char(model, tok, [text], window=w, stride=w, batch_size=3, pad_id=0)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 3 * w
    nats = 0.0
    for j in range(1, len(ids)):
        ctx = ids[((j - 1) // w) * w: j]
        with torch.no_grad():
            nats -= float(torch.log_softmax(model(torch.tensor([ctx])).logits[0, -1].double(), -1)[ids[j]])
    assert res["bits"] == pytest.approx(nats / math.log(2), rel=1e-5)


def test_uniform_model_gives_log2_vocab_bits_per_token(model, tok):
    """A model with zero output weights predicts uniformly: exactly 15 bits per token at vocab 32768."""
    flat = LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        flat.lm_head.weight.zero_()
    docs = texts()
    res = bpc.bits_per_char(flat, tok, docs, window=16, stride=5, batch_size=4, pad_id=0)
    assert res["bits"] == pytest.approx(15 * res["tokens"], rel=1e-6)
    assert res["bpc"] == pytest.approx(15 * res["tokens"] / sum(map(len, docs)), rel=1e-5)


def test_read_texts_names_the_bad_line(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"text": "ok"}\n\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"h.jsonl:3: not a JSON record with a 'text' field"):
        bpc.read_texts(p)
    assert bpc.read_texts(p, max_docs=1) == ["ok"]
