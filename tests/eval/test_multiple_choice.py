"""Multiple-choice scoring: batched + padded equals a brute-force reference (C-Eval, MMLU, C3 with 2-4 options);
letter ids; truncation; the passage layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import tiny_llama
from cptflow.eval import forward
from cptflow.eval import multiple_choice as mc_eval
from cptflow.eval import templates
from cptflow.eval.benchmarks import BenchmarkSpec, Question, has_split, read_questions

ROOT = Path(__file__).resolve().parents[2]
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
    for name, split in (("ceval", "val"), ("mmlu", "test")):
        t = templates.TEMPLATES[name]
        shots = questions(name, name, "dev", 1)
        for q in questions(name, name, split, 3):
            out.append(mc_eval.prepare(tok, t, q.subject, shots, q, max_len=512))
    return out


@pytest.mark.parametrize("path", ["packed-sdpa", "packed-eager", "one-sequence-per-option"])
def test_batched_scoring_matches_brute_force(model, items, path, monkeypatch):
    """Left padding, batching, position ids and packing the options after one shared context (under sdpa's
    boolean or eager's additive mask) change nothing: one unpadded forward per sequence agrees."""
    assert len({len(it.letter_prompt) for it in items}) > 3  # lengths differ, so batches are padded
    if path == "packed-eager":
        model = tiny_llama(layers=2, heads=4, kv_heads=2, max_positions=512, lm_head_scale=50)
        model.set_attn_implementation("eager")
    assert forward.can_pack(model)
    if path == "one-sequence-per-option":
        monkeypatch.setattr(forward, "can_pack", lambda m: False)
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
    t = templates.TEMPLATES["ceval"]
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
    assert text.endswith(templates.question_block(t, q, None))
    kept = shots[5 - short.letter_shots:]  # the last shots stay, the first ones go
    assert shots[0].question not in text and kept[0].question in text
    # Too long even without shots: cut from the left, question end and cue kept, and counted.
    tiny = mc_eval.prepare(tok, t, "计算机组成", shots, q, max_len=20)
    assert tiny.letter_shots == 0 and tiny.truncated == 2 and len(tiny.letter_prompt) == 20
    assert tok.decode(tiny.letter_prompt[1:]).endswith("答案：")


def test_left_pad_positions():
    ids, mask, pos = forward.left_pad([[5, 6, 7], [8]], pad_id=0)
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
    it = mc_eval.prepare(tok, templates.TEMPLATES["en"], "math", [], q, max_len=512)
    assert tok.convert_ids_to_tokens(it.letter_ids) == ["▁A", "▁B", "▁C", "▁D", "▁E"]
    row = mc_eval.score_items(model, [it], batch_size=2, pad_id=0)[0]
    assert len(row["letter_logits"]) == 5 and len(row["option_logprob"]) == 5
    (tmp_path / "val" / "math.jsonl").write_text(json.dumps({**rec, "label": "F"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"math.jsonl:1: label 'F' is not one of A-E"):
        next(read_questions(spec, "val"))


def test_c3_items_match_plain_full_sequence_forward_passes(model, tok):
    """C3 questions with 2, 3 and 4 options (reading_zh, one shot): each score equals a plain forward pass of the
    whole prompt + option string, tokenized on its own, with no padding, batching or prefix splitting."""
    spec = BenchmarkSpec("c3", str(DEMO / "benchmarks/c3"), "c3", eval_split="dev")
    qs = list(read_questions(spec, "dev"))
    picks = [next(q for q in qs if len(q.options) == k) for k in (2, 3, 4)]
    shot = min((q for q in qs if q not in picks), key=lambda q: len(q.passage))
    t = templates.template_for(spec)
    items = [mc_eval.prepare(tok, t, "m", [shot], q, max_len=512) for q in picks]
    assert all(it.letter_shots == it.text_shots == 1 and not it.truncated for it in items)
    rows = mc_eval.score_items(model, items, batch_size=2, pad_id=0)
    for q, row in zip(picks, rows):
        letters = mc_eval.LETTERS[:len(q.options)]
        with torch.no_grad():
            prompt = templates.build_prompt(t, "m", [shot], q, "letter")
            p_ids = tok(prompt)["input_ids"]
            logits = model(torch.tensor([p_ids])).logits[0, -1]
            letter_ids = [tok(prompt + L)["input_ids"][-1] for L in letters]
            ref_letters = logits[letter_ids]
            prompt = templates.build_prompt(t, "m", [shot], q, "text")
            n_p = len(tok(prompt)["input_ids"])
            ref_ll = []
            for o in q.options:
                full = tok(prompt + o)["input_ids"]
                lp = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1)
                ref_ll.append(float(sum(lp[j - 1, full[j]] for j in range(n_p, len(full)))))
        assert len(row["letter_logits"]) == len(row["option_logprob"]) == len(q.options)
        assert torch.allclose(torch.tensor(row["letter_logits"]), ref_letters, atol=1e-3), q.qid
        assert row["option_logprob"] == pytest.approx(ref_ll, abs=2e-3), q.qid
        assert row["first_token"] == letters[int(ref_letters.argmax())]
        assert row["option_loglik"] == letters[max(range(len(ref_ll)), key=ref_ll.__getitem__)]
        norm = [v / len(o) for v, o in zip(ref_ll, q.options)]
        assert row["option_loglik_norm"] == letters[max(range(len(norm)), key=norm.__getitem__)]


def test_c3_layout_reads_the_published_records(tmp_path):
    spec = BenchmarkSpec("c3", str(DEMO / "benchmarks/c3"), "c3", eval_split="dev")
    assert has_split(spec, "dev") and not has_split(spec, "test")
    qs = list(read_questions(spec, "dev"))
    assert len(qs) == 51 and {len(q.options) for q in qs} == {2, 3, 4}
    raw = json.loads((DEMO / "benchmarks/c3/c3-m-dev.json").read_text(encoding="utf-8"))
    assert qs[0].passage == "\n".join(raw[0][0]) and qs[0].qid == f"{raw[0][2]}-0" and qs[0].subject == "m"
    assert all(q.options[mc_eval.LETTERS.index(q.answer)] == item["answer"]
               for q, item in zip(qs, (it for rec in raw for it in rec[1])))
    bad = [[["一段话。"], [{"question": "问？", "choice": ["甲", "乙"], "answer": "丙"}], "1-1"]]
    (tmp_path / "c3-d-dev.json").write_text(json.dumps(bad, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(ValueError, match=r"c3-d-dev.json: record 0 \(1-1\) question 0: answer '丙' is not one of"):
        list(read_questions(BenchmarkSpec("c3", str(tmp_path), "c3"), "dev"))
    with pytest.raises(FileNotFoundError, match="no c3 file of split 'test'"):
        list(read_questions(spec, "test"))


def test_logiqa_layout(tmp_path):
    """LogiQA's text format: blank line, answer letter, passage, question, four lettered options."""
    record = "\n{ans}\n{n}.甲比乙高，乙比丙高。\n以下哪项为真？\nA.甲比丙高\nB.丙比甲高\nC，甲和丙一样高\nD.无法判断\n"
    (tmp_path / "zh_test.txt").write_text(record.format(ans="a", n=1) + record.format(ans="d", n=2), encoding="utf-8")
    (tmp_path / "Test.txt").write_text("\nb\nTom is taller.\nWho is taller?\nA.Tom\nB.Ann\nC.Both\nD.None\n",
                                       encoding="utf-8")
    spec = BenchmarkSpec("logiqa", str(tmp_path), "logiqa", eval_split="test")
    qs = list(read_questions(spec, "test"))
    assert [(q.subject, q.answer) for q in qs] == [("en", "B"), ("zh", "A"), ("zh", "D")]
    assert qs[1].passage == "1.甲比乙高，乙比丙高。" and qs[1].question == "以下哪项为真？"
    assert qs[1].options == ("甲比丙高", "丙比甲高", "甲和丙一样高", "无法判断")
    assert templates.template_for(BenchmarkSpec("l", "x", "logiqa", lang="en")).name == "reading_en"
    (tmp_path / "zh_test.txt").write_text("\nx\np\nq\nA.1\nB.2\nC.3\nD.4\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"zh_test.txt:2: answer 'x' is not one of a-d"):
        list(read_questions(BenchmarkSpec("l", str(tmp_path), "logiqa", subjects=["zh"]), "test"))
    (tmp_path / "zh_test.txt").write_text("\na\np\nq\nA.1\nB.2\nX.3\nD.4\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"zh_test.txt:7: expected option C"):
        list(read_questions(BenchmarkSpec("l", str(tmp_path), "logiqa", subjects=["zh"]), "test"))


def test_jsonl_passage_is_kept_apart_from_the_question(tmp_path):
    (tmp_path / "test").mkdir()
    rec = {"passage": "P.", "question": "Q?", "options": ["(A)x", "(B)y", "(C)z", "(D)w"], "label": "B"}
    (tmp_path / "test" / "logiqa-en.jsonl").write_text(json.dumps(rec) + "\n", encoding="utf-8")
    q = next(read_questions(BenchmarkSpec("agi", str(tmp_path), "jsonl", lang="en"), "test"))
    assert (q.passage, q.question, q.text()) == ("P.", "Q?", "P.Q?\nx\ny\nz\nw")  # decontamination text as before
    t = templates.TEMPLATES["reading_en"]
    assert templates.question_block(t, q, None) == "Passage: P.\nQuestion: Q?\nA. x\nB. y\nC. z\nD. w\nAnswer:"


def test_packed_options_of_length_one_and_zero(model):
    """One-token continuations are read off the context's last position; an empty one scores 0; no context fails."""
    ctx = [1, 500, 600, 700]
    lps, last = forward.shared_prefix_logprobs(model, [ctx], [[[42], [43, 44, 45], []]], batch_size=2, pad_id=0,
                                               candidates=[[42, 43]])
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ctx + [43, 44]])).logits[0].double(), -1)
        logits = model(torch.tensor([ctx])).logits[0, -1]
    assert float(lps[0][0][0]) == pytest.approx(float(ref[3, 42]), abs=1e-4)
    assert [float(x) for x in lps[0][1]] == pytest.approx([float(ref[3, 43]), float(ref[4, 44]), float(ref[5, 45])],
                                                          abs=1e-4)
    assert lps[0][2].numel() == 0
    assert torch.allclose(last[0], logits[[42, 43]], atol=1e-4)
    with pytest.raises(ValueError, match="empty context"):
        forward.shared_prefix_logprobs(model, [[]], [[[1]]], batch_size=1, pad_id=0)
