"""The model side of training: load a Hugging Face causal LM, choose what trains, compute the loss, export.

Nothing here imports torch.distributed, DeepSpeed or flash-attn (torchtitan's split): ``parallel.py``
wraps the model, this module only knows the model. The training loss (chunked lm_head +
cross-entropy) and the packed-document attention masks live in ``cptflow.train.loss`` and
``cptflow.train.attention``. ``use_cache=False`` matters: training needs no KV cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch


TRAINABLE = ("all", "embeddings_only", "new_embeddings_only")
#: config.json key init_model writes: rows [0, n) are the base vocabulary, later rows are new.
BASE_VOCAB_KEY = "cptflow_base_vocab_size"
IGNORE_INDEX = -100  # labels value on padding (the Hugging Face / PyTorch cross-entropy convention)
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_model(model_dir: str | Path, attn_implementation: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load the causal LM in ``dtype`` (fp32 = master weights for autocast training), through the one loader."""
    from cptflow.model.loader import load_causal_lm  # safetensors only, no remote code, every tensor loaded

    model = load_causal_lm(model_dir, dtype, attn_implementation=attn_implementation)
    model.config.use_cache = False  # training: a cache wastes memory and disables packed-sequence masks
    return model


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the input model's weights are stored in (from the safetensors headers); export keeps it."""
    from cptflow.model.safetensors_header import stored_float_dtype, tensor_index

    return getattr(torch, stored_float_dtype([t for _, t in tensor_index(model_dir).values()], str(model_dir)))


def embedding_params(model: Any) -> list[torch.nn.Parameter]:
    """Input embedding and output projection (one tensor if they are tied)."""
    params: list[torch.nn.Parameter] = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and all(out.weight is not p for p in params):
        params.append(out.weight)
    return params


def _numel(p: Any) -> int:
    # Under ZeRO-3 a loaded parameter is an empty partition; DeepSpeed keeps the real size and shape
    # as attributes (read here without importing anything distributed).
    return getattr(p, "ds_numel", p.numel())


def _ndim(p: Any) -> int:
    return len(getattr(p, "ds_shape", p.shape))


def base_vocab_size(model: Any) -> int:
    """Rows of the base vocabulary, recorded by init_model in config.json (``BASE_VOCAB_KEY``)."""
    n = getattr(model.config, BASE_VOCAB_KEY, None)
    rows = _numel(model.get_input_embeddings().weight) // model.config.hidden_size
    if n is None:
        raise ValueError(f"trainable: new_embeddings_only needs {BASE_VOCAB_KEY} in the model's config.json "
                         "(written by init_model); this model has none: use embeddings_only")
    if not 0 < n < rows:
        raise ValueError(f"trainable: new_embeddings_only: the model has {rows} embedding rows and {n} base rows, "
                         "so no new row would train (vocab.method none adds none): use embeddings_only or all")
    return int(n)


def _keep_base_rows(n_base: int) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        # A zero gradient keeps AdamW's moments of these rows at +0.0, so its update is exactly 0 and
        # (with no decay on embeddings) base rows stay bit-identical; clipping only scales by > 0.
        grad = grad.clone()
        grad[:n_base] = 0
        return grad

    return hook


def set_trainable(model: Any, mode: str) -> int:
    """Set requires_grad on every parameter for ``mode``; return how many elements train.

    Sets every flag explicitly (True and False), so a model that was frozen before — a loaded
    embeddings_only stage, or the same object reused — really trains again under ``all``.
    ``new_embeddings_only`` trains only the rows past the base vocabulary (the tokens vocab added, and
    padding): a gradient hook zeroes the base rows' gradients, so they never move.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"trainable: unknown mode {mode!r}; allowed: {', '.join(TRAINABLE)}")
    for p in model.parameters():
        p.requires_grad_(mode == "all")
        handle = getattr(p, "_cptflow_row_hook", None)
        if handle is not None:  # a previous new_embeddings_only call on this object
            handle.remove()
            p._cptflow_row_hook = None
    if mode == "all":
        return sum(_numel(p) for p in model.parameters())
    n_base = base_vocab_size(model) if mode == "new_embeddings_only" else 0
    n = 0
    for p in embedding_params(model):
        p.requires_grad_(True)
        if n_base:
            if hasattr(p, "ds_numel"):
                raise ValueError("trainable: new_embeddings_only does not support DeepSpeed ZeRO-3 (partitioned "
                                 "embeddings); use ZeRO-1/2 or DDP")
            p._cptflow_row_hook = p.register_hook(_keep_base_rows(n_base))
        n += _numel(p) - n_base * (_numel(p) // _rows(p))
    return n


def _rows(p: Any) -> int:
    return int(getattr(p, "ds_shape", p.shape)[0])


def non_embedding_params(model: Any) -> int:
    """The transformer body: all parameters except the embedding and output matrices."""
    emb = {id(p) for p in embedding_params(model)}
    return sum(_numel(p) for p in model.parameters() if id(p) not in emb)


def matmul_params(model: Any) -> int:
    """N of the MFU formula: parameters doing a matmul per token, the body and lm_head (not the lookup)."""
    return non_embedding_params(model) + _numel(model.get_output_embeddings().weight)


def model_dims(model: Any) -> tuple[int, int]:
    """(layers, hidden size) for the attention term of the FLOPs formula."""
    return int(model.config.num_hidden_layers), int(model.config.hidden_size)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split for AdamW: decay matrices, but not embeddings, lm_head, norms or biases.

    Decay on the embeddings would pull every base row toward 0 while only new rows should learn
    (and rows of tokens absent from a batch would shrink for nothing); norms and biases don't decay (nanoGPT).
    """
    emb = {id(p) for p in embedding_params(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if _ndim(p) >= 2 and id(p) not in emb]
    no_decay = [p for p in trainable if _ndim(p) < 2 or id(p) in emb]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in backward; non-reentrant works with frozen inputs and DDP."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def export_hf(model: Any, src_dir: str | Path, out_dir: str | Path, dtype: torch.dtype,
              state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write an HF model dir: the input's non-weight files (tokenizer, generation config), then weights.

    ``out_dir`` should be a temporary path that the caller renames (cptflow.core.io.atomic_path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src_dir).iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name not in WEIGHT_INDEXES:
            shutil.copy2(f, out / f.name)
    if state_dict is None:
        state_dict = model.state_dict()
    state_dict = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()
                  for k, v in state_dict.items()}
    original = model.config.dtype if hasattr(model.config, "dtype") else None
    model.config.dtype = dtype
    model.save_pretrained(str(out), state_dict=state_dict)
    model.config.dtype = original
    # Training-time switches must not leak into the released config.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["use_cache"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
