"""Packed attention: documents in a packed row never attend to each other, at any micro-batch, with each kernel.

A packed row holds several documents; ``position_ids`` restart at 0 at every document start
(``cptflow.pack.splice``), so a document is a run of positions starting at 0. Each micro-batch is
turned into the inputs the chosen kernel needs (``model_inputs``):

* ``sdpa`` (the CPU path and the fallback): an explicit block-diagonal causal mask ``[B, 1, T, T]``
  (bool) for ``torch.nn.functional.scaled_dot_product_attention``; ``eager`` the same mask additive;
* ``flex``: PyTorch FlexAttention with a document ``BlockMask`` (torch's ``create_block_mask``, as
  torchtitan does): masked blocks are skipped, not computed. CUDA only for training: in torch 2.13
  FlexAttention runs forward on CPU (eager and compiled) but has no CPU backward;
* ``varlen``: the micro-batch flattened to ONE row of B·T tokens with cumulative sequence lengths
  (``cu_seqlens``), attention by flash-attn's ``flash_attn_varlen_func`` when that package is
  installed, else torch's own ``torch.nn.attention.varlen.varlen_attn`` (flash kernels inside torch,
  CUDA); on CPU a per-document SDPA loop (correct and slow: it is there so the path is tested).

Why the masks are built here and not left to transformers: transformers derives a packed mask from
``position_ids`` only when no mask is given, and not on every path — 5.23's sdpa/eager/flex do it at
any batch size (tests/train/test_attention.py checks it), but its flash-attention path only at batch
1 (``_is_packed_sequence``), and the detection costs a device sync. An explicit mask depends on no
heuristic, and the packed format of issue #10 (boundaries instead of position ids) maps onto the
same document ids. Sliding-window models (a window shorter than the sample) are refused: these
masks know no window.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("cptflow.train.attention")

KERNELS = ("auto", "sdpa", "flex", "varlen", "eager")
VARLEN_IMPL = "cptflow_varlen"  # our attention function's name in transformers' AttentionInterface
HF_IMPL = {"sdpa": "sdpa", "eager": "eager", "flex": "flex_attention", "varlen": VARLEN_IMPL}


def have_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def have_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_kernel(requested: str, device: torch.device, precision: str) -> str:
    """The kernel to train with; ``auto`` picks what the machine has and the caller logs it.

    auto: CUDA with bf16/fp16 -> varlen when flash-attn is installed (the most used packed kernel),
    else flex (no extra package); CPU, or fp32 on CUDA -> sdpa.
    """
    if requested not in KERNELS:
        raise ValueError(f"attn: unknown value {requested!r}; allowed: {', '.join(KERNELS)}")
    cuda = device.type == "cuda"
    half = precision in ("bf16", "fp16")
    if requested == "flex" and not cuda:
        raise ValueError("attn: flex trains on CUDA only (torch's FlexAttention has no backward on CPU); "
                         "use sdpa or auto")
    if requested == "varlen" and cuda and not (half and (have_flash_attn() or have_torch_varlen())):
        raise ValueError("attn: varlen on CUDA needs bf16/fp16 and flash-attn (pip install -e .[gpu]) or a torch "
                         "with torch.nn.attention.varlen; use attn: auto")
    if requested != "auto":
        return requested
    if cuda and half:
        return "varlen" if have_flash_attn() else "flex"
    if cuda:
        log.warning("attn auto: precision %s: flex/flash kernels need bf16/fp16, using sdpa", precision)
    return "sdpa"


def check_model(config: Any, length: int) -> None:
    """Refuse models whose attention these masks would get wrong (a sliding window inside the sample)."""
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < length:
        raise ValueError(f"model has sliding_window {window} < sample length {length}: packed masks here know no "
                         "window; pack shorter samples (pack.max_length) or train another model")


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] int: which document of its row each token belongs to (a new one at each position 0)."""
    return (position_ids == 0).cumsum(-1)


def block_causal_mask(doc: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, 1, T, T] bool: query i sees key j iff j <= i within the same document."""
    t = doc.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def flex_block_mask(doc: torch.Tensor) -> Any:
    """The same mask as a FlexAttention BlockMask (blocks with no visible key are skipped by the kernel)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q >= k) & (doc[b, q] == doc[b, k])

    b, t = doc.shape
    # _compile: build the mask with a compiled kernel instead of materialising [B, T, T] (torchtitan does too)
    return create_block_mask(document_causal, b, None, t, t, device=doc.device, _compile=doc.device.type == "cuda")


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> cumulative document lengths over the flattened micro-batch (int32, documents + 1 entries).

    Every row starts a document, even one whose first position is not 0 (a row never continues another).
    """
    starts = position_ids == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([idx, idx.new_tensor([position_ids.numel()])]).to(torch.int32)


def model_inputs(kernel: str, input_ids: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for the decoder's forward that keep attention within documents."""
    if kernel == "varlen":
        cu = cu_seqlens(position_ids)
        # max_length: the row length, an upper bound of every document (the kernels only size their grid by
        # it). The true maximum would be a new Python int per batch, and torch.compile recompiles on each.
        longest = position_ids.shape[1]
        return {"input_ids": input_ids.reshape(1, -1), "position_ids": position_ids.reshape(1, -1),
                "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    doc = document_ids(position_ids)
    if kernel == "flex":
        mask: Any = flex_block_mask(doc)
    elif kernel == "eager":  # transformers' eager attention adds the mask to the scores
        mask = torch.zeros(doc.shape[0], 1, doc.shape[1], doc.shape[1], device=doc.device)
        mask.masked_fill_(~block_causal_mask(doc), torch.finfo(torch.float32).min)
    else:
        mask = block_causal_mask(doc)
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask}


def _kernel_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
                   scale: float | None) -> torch.Tensor:
    """Causal attention per document; q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]."""
    if q.device.type == "cuda" and have_flash_attn():
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, softmax_scale=scale, causal=True)
    if q.device.type == "cuda":
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        if k.shape[1] != q.shape[1] and "enable_gqa" not in params:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        extra: dict[str, Any] = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        extra.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **extra)
    return _reference_varlen(q, k, v, cu, scale)


@torch.compiler.disable  # a data-dependent Python loop: keep torch.compile out of it
def _reference_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """CPU reference kernel: one causal SDPA per document (correct, slow; it makes the varlen path testable)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale,
                                                  enable_gqa=ks.shape[0] != qs.shape[0]).transpose(0, 1)
    return out


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function (registered as ``cptflow_varlen``): q/k/v [1, H, N, D] -> [1, N, H, D]."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("attn varlen: the decoder must get the flattened micro-batch and cu_seq_lens_q "
                         "(cptflow.train.attention.model_inputs)")
    if dropout:
        raise ValueError("attn varlen: attention dropout is not supported; set the model's attention_dropout to 0")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = _kernel_varlen(q, k, v, cu_seq_lens_q.to(q.device), int(max_length_q or q.shape[0]), scaling)
    return out.unsqueeze(0), None


def register() -> None:
    """Make ``attn_implementation="cptflow_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_IMPL, varlen_attention)
