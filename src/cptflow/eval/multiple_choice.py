"""Multiple-choice scoring (k-shot, two scorings) of prompts built by ``cptflow.eval.templates``.

Each benchmark's template lays out a header, k solved dev examples of the same subject (the first k in
file order) and the question, each as ``[passage] / question / A. .. / B. .. / cue``. Scorings, both
from the same model:

* ``first_token`` (C-Eval's and CMMLU's official scripts, ColossalEval): the argmax of the next-token
  logits after the cue, restricted to the option letters. Shots are answered with the letter. For a
  letter that is one token this is also lm-evaluation-harness's ``acc`` on its letter choices.
* ``option_loglik`` (lm-evaluation-harness style, continuation = the option's TEXT, not its letter):
  the option whose text has the highest summed log-probability after the cue; ``option_loglik_norm``
  divides by the text's characters (lm-eval ``acc_norm``). Shots are answered with the option text.
  We score the text, not " A": for a letter that is one token, the letter's log-likelihood has the
  same argmax as ``first_token``, so reporting it would repeat the first number. The text scoring
  asks which answer the model finds likely rather than whether it has learnt the letter format,
  which separates small base models better.

Token ids of a continuation come from the actual prompt: tokenize ``prompt + continuation`` and take
the tokens after the prompt's own tokens, after checking that the prompt's tokens are a prefix (a
SentencePiece letter is "▁A" after "Answer:" plus a space, "A" after "答案："). Where a continuation
merges with the cue's last token, all options are scored from their longest common prefix, so the
scores stay comparable. Batches are left padded with an attention mask and position ids counted from
each sequence's first real token, so padding does not change results; sequences are sorted longest
first before batching, so a batch holds similar lengths (little padding) and the first batch is the
largest (an out-of-memory shows at once). A prompt longer than the context loses whole shots from the
front; only a question too long on its own is cut (from the left, header first) and counted as
``truncated``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from cptflow.eval import forward
from cptflow.eval.benchmarks import Question
from cptflow.eval.templates import LETTERS, Template, build_prompt

log = logging.getLogger("cptflow.eval.multiple_choice")
SCORINGS = ("first_token", "option_loglik", "option_loglik_norm")


def continuation_ids(tok, prompt: str, conts: Sequence[str]) -> tuple[list[int], list[list[int]], int]:
    """(context ids, continuation ids per option, prompt length in tokens), split at the options' longest common
    prefix with the prompt's tokens; the context is the whole prompt when its tokens are a prefix of every option's."""
    enc = tok([prompt, *(prompt + c for c in conts)])["input_ids"]
    p_ids, fulls = enc[0], enc[1:]
    cut = len(p_ids)
    for f in fulls:
        n = 0
        while n < min(len(f), cut) and f[n] == p_ids[n]:
            n += 1
        cut = n
    return p_ids[:cut], [f[cut:] for f in fulls], len(p_ids)


@dataclass
class Item:
    q: Question
    letter_prompt: list[int] = field(default_factory=list)
    letter_ids: list[int] = field(default_factory=list)
    letter_shots: int = 0
    ctx: list[int] = field(default_factory=list)
    conts: list[list[int]] = field(default_factory=list)
    text_shots: int = 0
    truncated: int = 0  # scorings whose question had to be cut


def prepare(tok, t: Template, subject: str, shots: Sequence[Question], q: Question, max_len: int) -> Item:
    """Token ids for both scorings, dropping shots from the front until each fits ``max_len``."""
    item = Item(q)
    letters = LETTERS[: len(q.options)]
    for k in range(len(shots), -1, -1):
        prompt = build_prompt(t, subject, shots[len(shots) - k:], q, "letter")
        ctx, conts, n_prompt = continuation_ids(tok, prompt, [t.sep + L for L in letters])
        if len(ctx) != n_prompt or any(not c for c in conts) or len({c[0] for c in conts}) < len(conts):
            raise ValueError(f"{q.benchmark}/{q.subject}/{q.qid}: option letters after {t.cue!r} do not tokenize as "
                             f"distinct new tokens after the prompt ({[tok.convert_ids_to_tokens(c) for c in conts]})")
        item.letter_prompt, item.letter_ids, item.letter_shots = ctx, [c[0] for c in conts], k
        if len(ctx) <= max_len:
            break
    if len(item.letter_prompt) > max_len:
        item.letter_prompt = item.letter_prompt[:1] + item.letter_prompt[len(item.letter_prompt) - max_len + 1:]
        item.truncated += 1
    for k in range(len(shots), -1, -1):
        prompt = build_prompt(t, subject, shots[len(shots) - k:], q, "text")
        item.ctx, item.conts, _ = continuation_ids(tok, prompt, [t.sep + o for o in q.options])
        item.text_shots = k
        if len(item.ctx) + max(map(len, item.conts)) - 1 <= max_len:
            break
    over = len(item.ctx) + max(map(len, item.conts)) - 1 - max_len
    if over > 0:
        item.ctx = item.ctx[:1] + item.ctx[over + 1:]
        item.truncated += 1
    return item


def option_logprob_sums(model, items: Sequence[Item], batch_size: int,
                        pad_id: int) -> tuple[list[list[float]], list[torch.Tensor | None]]:
    """Summed log-probabilities of each item's option continuations, and the letter logits where they come free.

    With a model whose attention takes a custom mask (sdpa, eager), the context runs once per item and
    its options share it (``forward.shared_prefix_logprobs``); where the letter prompt is that same
    context (0-shot), the letter logits are read off the same pass. Otherwise every option is its own
    sequence (context + option), as lm-evaluation-harness scores them.
    """
    if forward.can_pack(model):
        cands = [it.letter_ids if it.letter_prompt == it.ctx else None for it in items]
        lps, letters = forward.shared_prefix_logprobs(model, [it.ctx for it in items], [it.conts for it in items],
                                                      batch_size, pad_id, candidates=cands)
        return [[float(lp.sum()) for lp in per] for per in lps], letters
    seqs, tgts, owner = [], [], []
    for n, it in enumerate(items):
        for c in it.conts:
            seqs.append((it.ctx + c)[:-1])
            tgts.append(c)
            owner.append(n)
    sums: list[list[float]] = [[] for _ in items]
    for n, lp in zip(owner, forward.token_logprobs(model, seqs, tgts, batch_size, pad_id)):
        sums[n].append(float(lp.sum()))
    return sums, [None] * len(items)


def score_items(model, items: Sequence[Item], batch_size: int, pad_id: int) -> list[dict]:
    """Predictions of all three scorings, per item."""
    sums, letter = option_logprob_sums(model, items, batch_size, pad_id)
    todo = [n for n, lg in enumerate(letter) if lg is None]
    for n, lg in zip(todo, forward.next_token_logits(model, [items[n].letter_prompt for n in todo],
                                                     [items[n].letter_ids for n in todo], batch_size, pad_id)):
        letter[n] = lg
    out = []
    for it, lg, s in zip(items, letter, sums):
        norm = [v / max(1, len(o)) for v, o in zip(s, it.q.options)]
        pick = {"first_token": int(lg.argmax()), "option_loglik": max(range(len(s)), key=s.__getitem__),
                "option_loglik_norm": max(range(len(norm)), key=norm.__getitem__)}
        out.append({"benchmark": it.q.benchmark, "subject": it.q.subject, "qid": it.q.qid, "answer": it.q.answer,
                    **{k: LETTERS[v] for k, v in pick.items()},
                    "letter_logits": [round(float(x), 5) for x in lg], "option_logprob": [round(v, 5) for v in s],
                    "shots_first_token": it.letter_shots, "shots_option": it.text_shots, "truncated": it.truncated})
    return out


def letter_id_summary(tok, items: Sequence[Item]) -> dict[str, dict[str, int]]:
    """Which token ids the letters resolved to, with counts (one entry per letter in the normal case)."""
    seen: dict[str, Counter] = {}
    for it in items:
        for L, i in zip(LETTERS, it.letter_ids):
            seen.setdefault(L, Counter())[f"{i}:{tok.convert_ids_to_tokens(i)}"] += 1
    return {L: dict(sorted(c.items())) for L, c in sorted(seen.items())}
