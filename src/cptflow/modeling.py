"""The model side of training: load a Hugging Face causal LM, choose what trains, compute the loss, export.

Nothing here imports torch.distributed, DeepSpeed or flash-attn (torchtitan's split): ``parallel.py``
wraps the model, this module only knows the model. Packed samples are trained document by document:
the forward gets ``position_ids`` that restart at 0 per document and *no* attention mask, which
makes transformers build a block-diagonal causal mask (SDPA/eager, ``find_packed_sequence_indices``)
or use variable-length flash attention. ``use_cache=False`` matters: a KV cache switches that off.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cptflow.train_data import IGNORE_INDEX

TRAINABLE = ("all", "embeddings_only")
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def load_model(model_dir: str | Path, attn_implementation: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load the causal LM in ``dtype`` (fp32 = master weights for autocast training)."""
    from transformers import AutoModelForCausalLM

    from cptflow.hf import check_model_dir  # safetensors only: never unpickle weights

    model = AutoModelForCausalLM.from_pretrained(str(check_model_dir(model_dir)), dtype=dtype,
                                                 attn_implementation=attn_implementation, use_safetensors=True,
                                                 trust_remote_code=False, local_files_only=True)
    model.config.use_cache = False  # training: a cache wastes memory and disables packed-sequence masks
    return model


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the input model's weights are stored in (from a safetensors header); export keeps it."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return torch.float32
    with open(files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    for name, dt in (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16)):
        if name in dtypes:
            return dt
    return torch.float32


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


def set_trainable(model: Any, mode: str) -> int:
    """Set requires_grad on every parameter for ``mode``; return how many elements train.

    Sets every flag explicitly (True and False), so a model that was frozen before — a loaded
    embeddings_only stage, or the same object reused — really trains again under ``all``.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"trainable: unknown mode {mode!r}; allowed: {', '.join(TRAINABLE)}")
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    if mode == "embeddings_only":
        for p in embedding_params(model):
            p.requires_grad_(True)
    return sum(_numel(p) for p in model.parameters() if p.requires_grad)


def non_embedding_params(model: Any) -> int:
    """N of the MFU formula: all parameters except the embedding and output matrices."""
    emb = {id(p) for p in embedding_params(model)}
    return sum(_numel(p) for p in model.parameters() if id(p) not in emb)


def model_dims(model: Any) -> tuple[int, int]:
    """(layers, hidden size) for the attention term of the FLOPs formula."""
    return int(model.config.num_hidden_layers), int(model.config.hidden_size)


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split for AdamW: decay matrices (dim >= 2), not norms or biases (nanoGPT)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if _ndim(p) >= 2]  # matrices decay; norms and biases don't
    no_decay = [p for p in trainable if _ndim(p) < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy (fp32) over non-padding targets of ``batch``.

    A sum, not a mean: the caller divides by the token count of the whole global batch, so every
    token weighs the same whatever micro-batch or rank it landed on (and 1 process == N processes).
    """
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    logits = out.logits[:, :-1, :].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


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

    ``out_dir`` should be a temporary path that the caller renames (cptflow.io.atomic_path).
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
