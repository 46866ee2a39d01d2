"""Forward passes for scoring: left-padded batches, next-token logits, target log-probabilities, and many
continuations of one shared context in a single packed sequence.

Batches are left padded with an attention mask and position ids counted from each sequence's first
real token, so padding does not change results. Sequences are sorted longest first before batching:
a batch holds similar lengths (little padding) and the first batch is the largest, so running out of
memory shows at once rather than after an hour. The vocabulary projection is applied only where a
score is read (the last position for letters, the target positions for log-probabilities).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


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


def can_pack(model) -> bool:
    """Whether the model's attention takes an arbitrary 4D mask (sdpa, eager); flash/flex variants do not."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager")


def _packed_mask(segs: torch.Tensor, dtype: torch.dtype, boolean: bool) -> torch.Tensor:
    """[B, 1, W, W] mask from segment ids [B, W] (-1 pad, 0 shared context, k >= 1 continuation k): a token sees
    earlier tokens of the context and of its own segment; a pad sees only itself (no empty softmax rows)."""
    w = segs.shape[1]
    pos = torch.arange(w, device=segs.device)
    q, k = segs[:, :, None], segs[:, None, :]
    ok = (pos[None, :, None] >= pos[None, None, :]) & (k >= 0) & ((k == 0) | (k == q))
    ok |= (q < 0) & torch.eye(w, dtype=torch.bool, device=segs.device)[None]
    if boolean:
        return ok[:, None]
    return torch.zeros(ok.shape, dtype=dtype, device=segs.device).masked_fill(~ok, torch.finfo(dtype).min)[:, None]


@torch.inference_mode()
def shared_prefix_logprobs(model, ctxs: Sequence[Sequence[int]], conts: Sequence[Sequence[Sequence[int]]],
                           batch_size: int, pad_id: int, candidates: Sequence[Sequence[int] | None] | None = None,
                           chunk: int = 256) -> tuple[list[list[torch.Tensor]], list[torch.Tensor | None]]:
    """Per item, per continuation: log P of the continuation's tokens after the item's context, the context run once.

    Item i becomes one sequence: its context, then for each continuation every token but its last (the
    inputs that predict it). A 4D mask lets each continuation see the context and itself only, and its
    position ids go on from the context's end, so each continuation is scored as if it followed the
    context alone: k options cost one context plus k short tails instead of k contexts. Where
    ``candidates[i]`` is given, also returns the next-token logits after the context at those ids.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    boolean = model.config._attn_implementation == "sdpa"  # sdpa takes a boolean mask (1 byte per entry)
    head = model.get_output_embeddings()
    cands = list(candidates) if candidates is not None else [None] * len(ctxs)
    seqs, segs, poss, reads = [], [], [], []
    for ctx, cs in zip(ctxs, conts):
        if not ctx:
            raise ValueError("shared_prefix_logprobs: an empty context has no position to predict the first token from")
        ids, seg, pos, read = list(ctx), [0] * len(ctx), list(range(len(ctx))), []
        for k, c in enumerate(cs, 1):
            # hidden states that predict c: the context's last token, then c[0] .. c[-2]
            read.append([len(ctx) - 1] + list(range(len(ids), len(ids) + len(c) - 1)))
            ids += c[:-1]
            seg += [k] * (len(c) - 1)
            pos += range(len(ctx), len(ctx) + len(c) - 1)
        seqs.append(ids)
        segs.append(seg)
        poss.append(pos)
        reads.append(read)
    out: list[list[torch.Tensor]] = [[] for _ in ctxs]
    last: list[torch.Tensor | None] = [None] * len(ctxs)
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        w = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), w), pad_id, dtype=torch.long)
        seg = torch.full((len(idx), w), -1, dtype=torch.long)
        pos = torch.zeros((len(idx), w), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(seqs[i])
            ids[row, w - n:] = torch.tensor(seqs[i], dtype=torch.long)
            seg[row, w - n:] = torch.tensor(segs[i], dtype=torch.long)
            pos[row, w - n:] = torch.tensor(poss[i], dtype=torch.long)
        mask = _packed_mask(seg.to(device), dtype, boolean)
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask, position_ids=pos.to(device),
                                  use_cache=False).last_hidden_state
        for row, i in enumerate(idx):
            off = w - len(seqs[i])
            if cands[i] is not None:
                last[i] = head(hidden[row, off + len(ctxs[i]) - 1]).float().cpu()[list(cands[i])]
            for c, read in zip(conts[i], reads[i]):
                if not c:
                    out[i].append(torch.empty(0))
                    continue
                h = hidden[row, [off + r for r in read]]
                tgt = torch.tensor(c, dtype=torch.long, device=hidden.device)
                parts = [torch.log_softmax(head(h[s:s + chunk]).float(), dim=-1).gather(1, tgt[s:s + chunk, None])[:, 0]
                         for s in range(0, len(tgt), chunk)]
                out[i].append(torch.cat(parts).cpu())
    return out, last
