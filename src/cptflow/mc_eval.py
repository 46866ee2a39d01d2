"""Multiple-choice scoring for C-Eval / CMMLU / MMLU style benchmarks (k-shot, two scorings).

Prompts follow the benchmarks' own papers: C-Eval/CMMLU "以下是中国关于{subject}考试的单项选择题，请选出其中的
正确答案。" and MMLU "The following are multiple choice questions (with answers) about {subject}.", then k
solved dev examples of the same subject (the first k in file order) and the question, each as
``question / A. .. / B. .. / cue``. Scorings, both from the same model:

* ``first_token`` (ColossalEval, C-Eval's official script): the argmax of the next-token logits after
  the cue, restricted to the option letters. Shots are answered with the letter.
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
each sequence's first real token, so padding does not change results. A prompt longer than the
context loses whole shots from the front; only a question too long on its own is cut (from the
left, header first) and counted as ``truncated``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from cptflow.benchmarks import Question

log = logging.getLogger("cptflow.mc_eval")
LETTERS = "ABCDEFGHIJ"
TEMPLATE_VERSION = 1  # bump when prompt building changes; part of the template hash


@dataclass(frozen=True)
class Template:
    name: str
    header: str  # "{subject}" is replaced by the subject's display name
    option: str  # one option line
    cue: str  # what the answer follows
    sep: str  # between the cue and the answer: "" in Chinese, " " in English
    shot_end: str = "\n\n"


TEMPLATES = {
    "zh": Template("zh", "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "{letter}. {text}", "答案：", ""),
    "en": Template("en", "The following are multiple choice questions (with answers) about {subject}.\n\n",
                   "{letter}. {text}", "Answer:", " "),
}
SCORINGS = ("first_token", "option_loglik", "option_loglik_norm")


def template_hash(t: Template) -> str:
    """Short sha256 of everything that shapes a prompt, recorded beside every number."""
    blob = json.dumps({**asdict(t), "version": TEMPLATE_VERSION}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def answer_text(q: Question, style: str) -> str:
    assert q.answer is not None
    return q.answer if style == "letter" else q.options[LETTERS.index(q.answer)]


def question_block(t: Template, q: Question, answer: str | None) -> str:
    lines = [q.question, *(t.option.format(letter=L, text=o) for L, o in zip(LETTERS, q.options)), t.cue]
    text = "\n".join(lines)
    return text if answer is None else text + t.sep + answer + t.shot_end


def build_prompt(t: Template, subject: str, shots: Sequence[Question], q: Question, style: str) -> str:
    return (t.header.format(subject=subject) + "".join(question_block(t, s, answer_text(s, style)) for s in shots)
            + question_block(t, q, None))


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


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids (0 at each sequence's first real token) for a left-padded batch."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@torch.inference_mode()
def hidden_batches(model, inputs: Sequence[Sequence[int]], batch_size: int,
                   pad_id: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices, last hidden states [B, L, H]) longest first, so batches hold similar lengths."""
    device = next(model.parameters()).device
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), i))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, pos = left_pad([inputs[i] for i in idx], pad_id)
        out = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               position_ids=pos.to(device), use_cache=False)
        yield idx, out.last_hidden_state


@torch.inference_mode()
def next_token_logits(model, inputs: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
                      batch_size: int, pad_id: int) -> list[torch.Tensor]:
    """Logits (float32) of the next token after each input, at the candidate ids only."""
    head = model.get_output_embeddings()
    out: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    for idx, hidden in hidden_batches(model, inputs, batch_size, pad_id):
        logits = head(hidden[:, -1]).float().cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row, list(candidates[i])]
    return out


@torch.inference_mode()
def token_logprobs(model, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], batch_size: int,
                   pad_id: int, chunk: int = 256) -> list[torch.Tensor]:
    """log P(targets[i][j]) where the targets follow the last ``len(targets[i])`` positions of ``inputs[i]``.

    The vocabulary projection runs ``chunk`` positions at a time: logits of a long window at a 100k+
    vocabulary would not fit in memory at once.
    """
    head = model.get_output_embeddings()
    out: list[torch.Tensor] = [torch.empty(0)] * len(inputs)
    for idx, hidden in hidden_batches(model, inputs, batch_size, pad_id):
        for row, i in enumerate(idx):
            tgt = torch.tensor(targets[i], dtype=torch.long, device=hidden.device)
            h = hidden[row, hidden.shape[1] - len(tgt):]
            parts = []
            for s in range(0, len(tgt), chunk):
                lp = torch.log_softmax(head(h[s:s + chunk]).float(), dim=-1)
                parts.append(lp.gather(1, tgt[s:s + chunk, None])[:, 0].cpu())
            out[i] = torch.cat(parts) if parts else torch.empty(0)
    return out


def score_items(model, items: Sequence[Item], batch_size: int, pad_id: int) -> list[dict]:
    """Predictions of all three scorings, per item."""
    letter = next_token_logits(model, [it.letter_prompt for it in items], [it.letter_ids for it in items],
                               batch_size, pad_id)
    seqs, tgts, owner = [], [], []
    for n, it in enumerate(items):
        for c in it.conts:
            full = it.ctx + c
            seqs.append(full[:-1])
            tgts.append(c)
            owner.append(n)
    lps = token_logprobs(model, seqs, tgts, batch_size, pad_id)
    sums: list[list[float]] = [[] for _ in items]
    for n, lp in zip(owner, lps):
        sums[n].append(float(lp.sum()))
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
