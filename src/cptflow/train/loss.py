"""The training loss: the decoder's hidden states -> lm_head -> cross-entropy, chunk by chunk.

The plain loss (``model(...).logits`` then ``F.cross_entropy``) holds the ``[tokens, vocab]`` logits
at once, in bf16 and again in fp32, plus their gradient: 4.7 GB for the fp32 copy alone at 4 x 4096
tokens x a 72 k vocabulary. ``linear_cross_entropy`` never does: it walks ``chunk_tokens`` rows at a
time, computing the fp32 logits of the chunk, its loss, and at once its gradients with respect to
the hidden states and the lm_head weight (the fused linear cross-entropy of Liger-Kernel and
Apple's cut-cross-entropy, in plain torch). The chunk's logits are freed before the next chunk, so
the peak is one chunk's ``[chunk_tokens, vocab]`` instead of the whole batch's, and no matmul is
recomputed: backward only scales the stored gradients by the incoming gradient (the loss is a sum,
so that gradient is one scalar), in place. What it holds does not grow with the token count: the
lm_head-sized fp32 weight gradient, a bf16 copy of the weight under autocast, and one chunk
(bench/gpu.py measures it). In fp32 the result equals the plain loss to rounding
(tests/train/test_loss.py: within 1e-6, gradients too).

``CausalLMLoss`` is the module the engines wrap (DDP, FSDP2, DeepSpeed): it runs the decoder with
the packed-attention inputs of ``cptflow.train.attention`` and returns the summed loss, so the
full model's ``forward`` (which would build the logits) is never called.
"""

from __future__ import annotations

from typing import Any

import torch

from cptflow.model.modeling import IGNORE_INDEX
from cptflow.train import attention


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i) over targets != IGNORE_INDEX, gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                dtype: torch.dtype) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)  # a sum of many chunks: fp64
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit here
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk]
                valid = t != IGNORE_INDEX  # no early exit on an all-padding chunk: that check would sync the GPU
                logits = (h @ w.t()).float()  # [c, V] in fp32: the only [*, vocab] tensor, one chunk at a time
                lse = torch.logsumexp(logits, dim=-1)
                safe_t = t.clamp_min(0)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                total += ((lse - picked) * valid).sum().double()
                if want_h or want_w:
                    g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    g[torch.arange(g.shape[0], device=g.device), safe_t] -= 1.0
                    g.mul_(valid[:, None])
                    g = g.to(dtype)
                    if want_h:
                        grad_h[s:s + chunk] = (g @ w).to(hidden.dtype)
                    if want_w:  # fp32 += bf16 in place: no fp32 temporary of lm_head's size
                        grad_w.add_(g.t() @ h)
        # Kept on ctx, not save_for_backward: backward hands them to autograd, which can then adopt them as
        # .grad without a copy (nothing else holds them any more); an lm_head-sized fp32 buffer saved.
        ctx.grads, ctx.weight_dtype = (grad_h, grad_w), weight.dtype
        return total.float()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: a second backward through the same loss (retain_graph) is "
                               "not supported; run the forward again")
        (grad_h, grad_w), ctx.grads = ctx.grads, None  # scaled in place and handed over: one backward only
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [N, H] @ weight[V, H].T`` against ``targets [N]`` (fp32 scalar).

    The matmuls run in the autocast dtype when autocast is on (as ``lm_head`` would), else in the
    hidden states' dtype (bf16 under FSDP2's mixed precision, fp32 otherwise); logits and the
    softmax are fp32.
    """
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, max(1, int(chunk_tokens)), dtype)


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets: position t predicts label t+1; the last position predicts nothing.

    Shifting per row before any flattening keeps row b's last token from "predicting" row b+1's first.
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def check_head(config: Any) -> None:
    """Refuse models whose logits are more than ``lm_head(hidden)`` (this loss would silently skip the rest)."""
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"model config sets {key} = {getattr(config, key)}: the chunked loss computes plain "
                             "lm_head logits; this model family is not supported")


class CausalLMLoss(torch.nn.Module):
    """What the engines wrap: (input_ids, position_ids, labels) -> summed next-token loss (fp32 scalar)."""

    def __init__(self, lm: Any, kernel: str, chunk_tokens: int):
        super().__init__()
        check_head(lm.config)
        self.lm = lm  # the Hugging Face causal LM; its state_dict keys get the prefix "lm."
        self.kernel = kernel
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        inputs = attention.model_inputs(self.kernel, input_ids, position_ids)
        hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
        targets = shift_targets(labels).reshape(-1)
        weight = self.lm.get_output_embeddings().weight
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets, self.chunk_tokens)
