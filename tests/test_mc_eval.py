"""Multiple-choice scoring: batched + padded equals a brute-force reference; letter ids; truncation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import tiny_llama
from cptflow import mc_eval
from cptflow.benchmarks import BenchmarkSpec, Question, read_questions

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "workflow/resources/demo"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(DEMO / "tokenizer")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2, heads=4, kv_heads=2, max_positions=512, lm_head_scale=50)


def questions(name: str, layout: str, split: str, n: int) -> list[Question]:
    spec = BenchmarkSpec(name, str(DEMO / "benchmarks" / name), layout)
    return list(read_questions(spec, split))[:n]


@pytest.fixture(scope="module")
def items(tok):
    """Chinese (C-Eval) and English (MMLU) questions, one shot each, of varied lengths."""
    out = []
    for name, lang, split in (("ceval", "zh", "val"), ("mmlu", "en", "test")):
        t = mc_eval.TEMPLATES[lang]
        shots = questions(name, name, "dev", 1)
        for q in questions(name, name, split, 3):
            out.append(mc_eval.prepare(tok, t, q.subject, shots, q, max_len=512))
    return out


def test_batched_scoring_matches_brute_force(model, items):
    """Left padding, batching and position ids change nothing: one unpadded forward per sequence agrees."""
    assert len({len(it.letter_prompt) for it in items}) > 3  # lengths differ, so batches are padded
    rows = mc_eval.score_items(model, items, batch_size=3, pad_id=0)
    for it, row in zip(items, rows):
        with torch.no_grad():
            ref = model(torch.tensor([it.letter_prompt])).logits[0, -1, it.letter_ids]
            lls = []
            for c in it.conts:
                logits = model(torch.tensor([it.ctx + c])).logits[0]
                lp = torch.log_softmax(logits[len(it.ctx) - 1:-1], -1)
                lls.append(float(lp.gather(1, torch.tensor(c)[:, None]).sum()))
        assert torch.allclose(torch.tensor(row["letter_logits"]), ref, atol=1e-3), it.q.qid
        assert row["first_token"] == mc_eval.LETTERS[int(ref.argmax())]
        assert row["option_logprob"] == pytest.approx(lls, abs=1e-3)
        assert row["option_loglik"] == mc_eval.LETTERS[max(range(4), key=lls.__getitem__)]
        norm = [v / len(o) for v, o in zip(lls, it.q.options)]
        assert row["option_loglik_norm"] == mc_eval.LETTERS[max(range(4), key=norm.__getitem__)]


def test_letter_ids_with_and_without_leading_space_marker(tok, items):
    zh = [it for it in items if it.q.benchmark == "ceval"]
    en = [it for it in items if it.q.benchmark == "mmlu"]
    # "答案：A": the letter follows a full-width colon with no space → bare "A".
    assert tok.convert_ids_to_tokens(zh[0].letter_ids) == ["A", "B", "C", "D"]
    # "Answer: A": SentencePiece folds the space into the letter → "▁A".
    assert tok.convert_ids_to_tokens(en[0].letter_ids) == ["▁A", "▁B", "▁C", "▁D"]
    summary = mc_eval.letter_id_summary(tok, en)
    assert summary["A"] == {f"{en[0].letter_ids[0]}:▁A": len(en)}
    # The ids are what tokenizing prompt + letter really gives.
    full = tok(tok.decode(en[0].letter_prompt, skip_special_tokens=True) + " B")["input_ids"]
    assert full[-1] == en[0].letter_ids[1]


def test_continuation_split_at_common_prefix(tok):
    """When an option merges with the prompt's last token, all options are scored from the common prefix."""
    prompt = "Question: what?\nAnswer:"
    conts = [":)", " B", "-"]
    ctx, parts, n_prompt = mc_eval.continuation_ids(tok, prompt, conts)
    p_ids = tok(prompt)["input_ids"]
    assert ctx == p_ids[: len(ctx)]
    for c, part in zip(conts, parts):
        assert ctx + part == tok(prompt + c)["input_ids"]
    assert n_prompt == len(p_ids)


def test_truncation_drops_front_shots_and_keeps_the_question(tok):
    t = mc_eval.TEMPLATES["zh"]
    shots = questions("ceval", "ceval", "dev", 5)
    q = questions("ceval", "ceval", "val", 1)[0]
    full = mc_eval.prepare(tok, t, "计算机组成", shots, q, max_len=10_000)
    assert full.letter_shots == 5 and full.truncated == 0
    budget = len(full.letter_prompt) - 1
    short = mc_eval.prepare(tok, t, "计算机组成", shots, q, max_len=budget)
    assert 0 < short.letter_shots < 5 and short.truncated == 0
    assert len(short.letter_prompt) <= budget
    assert len(short.ctx) + max(map(len, short.conts)) - 1 <= budget
    text = tok.decode(short.letter_prompt, skip_special_tokens=True)
    assert text.endswith(mc_eval.question_block(t, q, None))
    kept = shots[5 - short.letter_shots:]  # the last shots stay, the first ones go
    assert shots[0].question not in text and kept[0].question in text
    # Too long even without shots: cut from the left, question end and cue kept, and counted.
    tiny = mc_eval.prepare(tok, t, "计算机组成", shots, q, max_len=20)
    assert tiny.letter_shots == 0 and tiny.truncated == 2 and len(tiny.letter_prompt) == 20
    assert tok.decode(tiny.letter_prompt[1:]).endswith("答案：")


def test_left_pad_positions():
    ids, mask, pos = mc_eval.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_five_option_jsonl_question(tok, model, tmp_path):
    """AGIEval-style records with five options get letters A-E everywhere."""
    (tmp_path / "val").mkdir()
    rec = {"question": "Which is prime?", "options": ["(A)4", "(B)6", "(C)7", "(D)8", "(E)9"], "label": "C"}
    (tmp_path / "val" / "math.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    spec = BenchmarkSpec("agi", str(tmp_path), "jsonl", lang="en", shots=0)
    q = next(read_questions(spec, "val"))
    assert q.options == ("4", "6", "7", "8", "9") and q.answer == "C"
    it = mc_eval.prepare(tok, mc_eval.TEMPLATES["en"], "math", [], q, max_len=512)
    assert tok.convert_ids_to_tokens(it.letter_ids) == ["▁A", "▁B", "▁C", "▁D", "▁E"]
    row = mc_eval.score_items(model, [it], batch_size=2, pad_id=0)[0]
    assert len(row["letter_logits"]) == 5 and len(row["option_logprob"]) == 5
    (tmp_path / "val" / "math.jsonl").write_text(json.dumps({**rec, "label": "F"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"math.jsonl:1: label 'F' is not one of A-E"):
        next(read_questions(spec, "val"))


def test_template_hash_is_stable_and_sensitive():
    zh = mc_eval.TEMPLATES["zh"]
    assert mc_eval.template_hash(zh) == mc_eval.template_hash(mc_eval.Template(**zh.__dict__))
    assert mc_eval.template_hash(zh) != mc_eval.template_hash(mc_eval.Template(**{**zh.__dict__, "sep": " "}))
