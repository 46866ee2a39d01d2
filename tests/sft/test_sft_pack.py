"""sft_pack: the loss mask is every assistant turn and nothing else (against a per-turn reference on the real
conversations) and reaches the training stage's loss as labels -100 elsewhere; truncation keeps whole turns and
never cuts the first user turn; conversations are packed whole and do not attend to each other under the training
stage's packed-attention masks, at micro-batch 2, with every CPU kernel."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from cptflow.model import modeling
from cptflow.sft import packed, sft_pack
from cptflow.train import attention
from cptflow.train.loss import CausalLMLoss
from cptflow.sft.template import (
    FIREFLY_TEMPLATE, Unencodable, encode, fit, install_template, resolve_template, special_token_pattern,
)
from support.sft import TOKENIZER, firefly_messages, make_chat_model, write_conversations


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def reference(tok, turns: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Ids and mask from turns rendered one by one: a turn's tokens are what its text adds to the tokenized prefix."""
    text, ids, mask = "", [], []
    for segment, target in turns:
        text += segment
        now = tok(text, add_special_tokens=False)["input_ids"]
        assert now[: len(ids)] == ids, "the prefix must tokenize the same"
        mask += [int(target)] * (len(now) - len(ids))
        ids = now
    return ids, mask


def firefly_turns(messages):  # Firefly's layout, written out by hand: <s>user</s>assistant</s>...
    return [("<s>", False)] + [(m["content"] + "</s>", m["role"] == "assistant") for m in messages]


def mistral_turns(messages):  # the demo tokenizer's own template (Mistral v0.3), without a system prompt
    return [("<s>", False)] + [("[INST] " + m["content"] + "[/INST]", False) if m["role"] == "user"
                               else (" " + m["content"].strip() + "</s>", True) for m in messages]


@pytest.mark.parametrize("which", ["firefly", "tokenizer"])
def test_loss_mask_equals_a_per_turn_reference_on_the_real_conversations(tok, which):
    template, origin = resolve_template("firefly" if which == "firefly" else "auto", tok)
    assert origin == which
    turns_of = firefly_turns if which == "firefly" else mistral_turns
    special = special_token_pattern(tok)
    for messages in firefly_messages():
        enc = encode(tok, template, messages, special)
        ids, mask = reference(tok, turns_of(messages))
        assert enc.input_ids.tolist() == ids
        assert enc.loss_mask.tolist() == mask
        # every assistant turn, each ending with the EOS the model must learn to stop with
        runs = np.flatnonzero(np.diff(np.r_[0, enc.loss_mask, 0]))
        starts, ends = runs[::2], runs[1::2]
        assert len(starts) == sum(m["role"] == "assistant" for m in messages)
        assert all(enc.input_ids[e - 1] == tok.eos_token_id for e in ends)
        assert enc.turn_ends == ends.tolist()


def test_truncation_keeps_whole_turns_and_never_cuts_the_first_user_turn(tok):
    template, _ = resolve_template("auto", tok)
    for messages in firefly_messages()[:8]:
        enc = encode(tok, template, messages)
        keep, how = fit(enc, 512)
        assert how == "turns_dropped" and keep in enc.turn_ends and keep <= 512
        turns = enc.turn_ends.index(keep) + 1
        assert enc.turn_ends[turns] > 512  # the next turn would not have fitted
        shorter = encode(tok, template, messages[: 2 * turns])  # the kept part is that conversation exactly
        assert shorter.input_ids.tolist() == enc.input_ids[:keep].tolist()
        assert shorter.loss_mask.tolist() == enc.loss_mask[:keep].tolist()
        # a budget below the first answer's end: the first prompt stays whole, its answer is cut
        budget = enc.prompt_end + 10
        keep, how = fit(enc, budget)
        assert (keep, how) == (budget, "reply_cut")
        assert not enc.loss_mask[: enc.prompt_end].any() and enc.loss_mask[enc.prompt_end: budget].all()
        with pytest.raises(Unencodable) as e:
            fit(enc, enc.prompt_end)  # the first user turn alone does not fit: dropped, not cut
        assert e.value.reason == "sft_pack_prompt_too_long"


@pytest.fixture(scope="module")
def pack_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_pack")
    convs = firefly_messages()
    extra = [
        [{"role": "user", "content": "What does </s> mean?"}, {"role": "assistant", "content": "An end token."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "Bye."}],
        [{"role": "user", "content": "长" * 400}, {"role": "assistant", "content": "太长了。"}],
    ]
    src = write_conversations(root / "c.jsonl", convs + extra)
    out = {}
    for run in ("a", "b"):
        d = root / run
        assert sft_pack.main(["--tokenizer", str(TOKENIZER), "--conversations", str(src), "--output-dir",
                              str(d / "data"), "--template", str(d / "t.jinja"), "--counts", str(d / "counts.json"),
                              "--stats", str(d / "stats.json"), "--params", json.dumps({"max_length": 256})]) == 0
        out[run] = d
    return {"root": root, "dirs": out, "messages": convs + extra}


def test_stage_packs_every_conversation_whole_and_counts_what_it_drops(pack_run, tok):
    d = pack_run["dirs"]["a"]
    counts = json.loads((d / "counts.json").read_text())
    # the literal </s>, the system prompt the Mistral template moves to the last user turn, the 400-char prompt
    assert counts["dropped"] == {"sft_pack_special_token_in_text": 1, "sft_pack_template_not_incremental": 1,
                                 "sft_pack_prompt_too_long": 1}
    assert counts["conversations"] == 33 and sum(counts["fit"].values()) == 33
    template = (d / "t.jinja").read_text(encoding="utf-8")
    assert template == tok.chat_template and counts["chat_template_origin"] == "tokenizer"
    ds, length = packed.open_rows(d / "data")
    assert length == 256 and len(ds) == counts["rows"]
    by_id = {f"firefly/dummy:{i + 1}": m for i, m in enumerate(pack_run["messages"])}
    rows = packed.load_rows(ds, np.arange(len(ds)), length)  # what finetune reads, through the training reader
    seen, targets = [], 0
    for r, members in enumerate(packed.row_members(ds, np.arange(len(ds)))):
        ids, labels, pos = rows["input_ids"][r], rows["labels"][r], rows["position_ids"][r]
        starts = np.flatnonzero(pos == 0)
        at = 0
        for cid, start in zip(members, starts):
            enc = encode(tok, template, by_id[cid])
            keep, _ = fit(enc, 256)
            assert start == at and pos[at: at + keep].tolist() == list(range(keep))
            assert ids[at: at + keep].tolist() == enc.input_ids[:keep].tolist()
            # the loss mask, as the training stage's loss sees it: the token where a target, -100 elsewhere
            want = np.where(enc.loss_mask[:keep] == 1, enc.input_ids[:keep], -100)
            assert labels[at: at + keep].tolist() == want.tolist()
            at += keep
        assert (labels[at:] == -100).all() and rows["real"][r] == at  # padding: never a target, not counted real
        if at < length:
            assert pos[at] == 0  # the padding is a segment of its own
        seen += members
        targets += int((labels != -100).sum())
    assert sorted(seen) == sorted(f"firefly/dummy:{i + 1}" for i in range(33))  # each exactly once
    assert counts["loss_tokens"] == targets
    b = pack_run["dirs"]["b"]
    files = sorted(f.relative_to(d / "data") for f in (d / "data").rglob("*") if f.is_file())
    assert "loss_mask.npy" in {f.name for f in files} and len(files) >= 8  # the shard, the index, the members
    for f in files:  # same input, same bytes
        assert (d / "data" / f).read_bytes() == (b / "data" / f).read_bytes(), f


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory):
    """The two packed rows (768 tokens) holding the most first exchanges of the real conversations, and the masks."""
    root = tmp_path_factory.mktemp("two_rows")
    convs = [m[:2] for m in firefly_messages()]  # first exchanges: many to a row
    firsts = write_conversations(root / "c.jsonl", convs)
    sft_pack.run(sft_pack.SftPackConfig(max_length=768), TOKENIZER, [firsts], root / "data", root / "t.jinja",
                 root / "counts.json")
    ds, length = packed.open_rows(root / "data")
    members = packed.row_members(ds, np.arange(len(ds)))
    rows = np.argsort([len(m) for m in members], kind="stable")[-2:]  # the two rows holding the most conversations
    assert min(len(members[r]) for r in rows) >= 2
    batch = {k: torch.from_numpy(v) for k, v in packed.load_rows(ds, rows, length).items()}
    template = (root / "t.jinja").read_text(encoding="utf-8")
    by_id = {f"firefly/dummy:{i + 1}": m for i, m in enumerate(convs)}
    masks = [[encode(AutoTokenizer.from_pretrained(str(TOKENIZER)), template, by_id[c]).loss_mask for c in members[r]]
             for r in rows]
    return {"batch": batch, "length": length, "masks": masks, "model": make_chat_model(root / "m")}


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "varlen"])
def test_packed_conversations_do_not_attend_to_each_other(two_rows, kernel):
    """Two packed rows in one micro-batch, through the training stage's masks and loss (cptflow.train.attention,
    CausalLMLoss): each conversation's logits equal it run alone, and the loss is the cross-entropy of the
    assistant tokens only, taken from the conversation's own loss mask (not from the stored labels)."""
    attention.register()
    model = modeling.load_model(two_rows["model"], attention.HF_IMPL[kernel]).eval()
    alone_model = modeling.load_model(two_rows["model"], "sdpa").eval()
    batch, length = two_rows["batch"], two_rows["length"]
    with torch.no_grad():
        inputs = attention.model_inputs(kernel, batch["input_ids"], batch["position_ids"])
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state.reshape(2, length, -1)
        logits = model.lm_head(hidden)
        total = CausalLMLoss(model, kernel, 64)(batch["input_ids"], batch["position_ids"], batch["labels"])
    ref = torch.zeros((), dtype=torch.float64)
    for r in range(2):
        pos = batch["position_ids"][r]
        starts = torch.nonzero(pos == 0).flatten().tolist() + [length]
        for (a, b), mask in zip(zip(starts[:-1], starts[1:]), two_rows["masks"][r]):  # conversations, then padding
            ids = batch["input_ids"][r: r + 1, a:b]
            with torch.no_grad():
                alone = alone_model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(logits[r: r + 1, a:b], alone, atol=1e-4, rtol=1e-4)
            target = torch.from_numpy(mask[1:]).bool()  # token t+1 is predicted from t: a target where masked
            ce = torch.nn.functional.cross_entropy(alone[0, :-1], ids[0, 1:], reduction="none")
            ref += ce[target].sum().double()
    torch.testing.assert_close(total.double(), ref, atol=1e-2, rtol=1e-5)


def test_a_conversations_file_that_changed_after_its_stage_is_refused(tmp_path, capsys):
    """sft_pack checks each conversations file against the manifest the conversations stage wrote beside it."""
    from cptflow.core.stats import Stats, write_manifest

    src = write_conversations(tmp_path / "c.jsonl", firefly_messages()[:4])
    write_manifest(tmp_path / "c.stats.json", stage="conversations", version=1, params={}, inputs=[], stats=Stats(),
                   seconds=0.0, outputs=[src])
    args = ["--tokenizer", str(TOKENIZER), "--conversations", str(src), "--output-dir", str(tmp_path / "data"),
            "--template", str(tmp_path / "t.jinja"), "--counts", str(tmp_path / "counts.json"),
            "--stats", str(tmp_path / "s.json"), "--params", "{}"]
    assert sft_pack.main(args) == 0
    src.write_text(src.read_text(encoding="utf-8").splitlines(keepends=True)[0], encoding="utf-8")  # cut short
    assert sft_pack.main(args) == 2
    assert "c.jsonl: differs from what conversations wrote" in capsys.readouterr().err


def test_plan_rows_places_each_conversation_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    plan = packed.plan_rows(lengths, 128)
    assert sorted(i for r in plan for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in plan)
    assert len(plan) <= 1.1 * sum(lengths) / 128 + 1  # best-fit decreasing wastes little
    assert plan == packed.plan_rows(lengths, 128)
    with pytest.raises(ValueError, match="does not fit"):
        packed.plan_rows([129], 128)


def test_template_choice_and_installation(tok, tmp_path):
    class NoTemplate:
        chat_template = None

    assert resolve_template("auto", NoTemplate()) == (FIREFLY_TEMPLATE, "firefly")
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert resolve_template(str(tmp_path / "mine.jinja"), tok)[1] == str(tmp_path / "mine.jinja")
    with pytest.raises(ValueError, match="neither auto, firefly nor an existing file"):
        resolve_template("chatml", tok)
    model = make_chat_model(tmp_path / "m", layers=1)
    install_template(model, FIREFLY_TEMPLATE)
    assert AutoTokenizer.from_pretrained(str(model)).chat_template == FIREFLY_TEMPLATE
