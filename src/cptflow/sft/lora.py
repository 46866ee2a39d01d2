"""What trains in SFT — LoRA on every linear layer, QLoRA, or everything — and merging adapters into full weights.

* ``lora``: peft LoRA on all linear layers except the output layer (peft's ``all-linear``, as Firefly's
  ``find_all_linear_names``), rank/alpha/dropout from config; the frozen base is held in the training
  precision (bf16 halves its memory), the adapters in fp32 (peft's ``autocast_adapter_dtype``).
* ``qlora``: the same adapters on a 4-bit NF4 base (double quantization, bf16/fp16 compute) through
  bitsandbytes. It needs a CUDA GPU and the bitsandbytes package (which needs CUDA, so it is not a
  dependency of the CPU install); without them the stage says so in a WARNING and trains LoRA.
* ``full``: every parameter trains (fp32 master weights, autocast), as CPT's ``trainable: all``.

Merging (``merge_adapter``) streams the start model's safetensors tensor by tensor (the memory of one
tensor, like the release stages) and writes ``W + (B @ A) * alpha / r`` for each adapted weight, in fp32,
cast to the stored dtype — the same arithmetic as peft's ``merge_and_unload`` (tested equal), without
loading the model. A QLoRA adapter is merged into the full-precision start model, not into the 4-bit
copy it trained against (QLoRA's and Firefly's practice: the 4-bit weights are an approximation).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from cptflow.core.io import PathLike, atomic_path, dumps_json, read_json
from cptflow.model import modeling
from cptflow.model.safetensors_io import model_files, read_header, read_tensor, weight_files, write_st
from cptflow.sft.config import FinetuneConfig

log = logging.getLogger("cptflow.sft.lora")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_method(cfg: FinetuneConfig, device: torch.device) -> str:
    """The method that will run: QLoRA only where it can (CUDA + bitsandbytes), else LoRA, said at WARNING."""
    if cfg.method != "qlora":
        return cfg.method
    missing = [why for ok, why in ((device.type == "cuda", "a CUDA device"),
                                   (importlib.util.find_spec("bitsandbytes") is not None,
                                    "the bitsandbytes package (pip install bitsandbytes; it needs CUDA)"))
               if not ok]
    if missing:
        log.warning("method qlora needs %s: falling back to LoRA on a %s base", " and ".join(missing), cfg.precision)
        return "lora"
    return "qlora"


def _load_4bit(model_dir: PathLike, cfg: FinetuneConfig, attn: str, device: torch.device) -> Any:
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from cptflow.model.loader import load_causal_lm  # the one safe loader, here with a 4-bit config

    compute = DTYPES[cfg.precision] if cfg.precision != "fp32" else torch.bfloat16
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    model = load_causal_lm(model_dir, compute, attn_implementation=attn, quantization_config=bnb,
                           device_map={"": device.index or 0})
    model.config.use_cache = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare(model_dir: PathLike, cfg: FinetuneConfig, method: str, attn: str, device: torch.device,
            hold_frozen_in_precision: bool = True) -> tuple[Any, Any, int]:
    """(model to train, peft model or None, trainable parameter count).

    The model to train is the Hugging Face model itself, with the LoRA layers peft injected into it, so
    the training loop and its loss see an ordinary causal LM; the peft wrapper is kept to save the adapter.
    ``hold_frozen_in_precision`` (DDP) keeps a LoRA run's frozen base in the training precision (bf16
    halves its memory); the sharding engines get fp32 throughout and cast as they gather (FSDP2 shards
    each unit's parameters as one dtype; DeepSpeed casts the whole module itself).
    """
    if method == "qlora":
        model = _load_4bit(model_dir, cfg, attn, device)
    else:
        frozen = DTYPES[cfg.precision] if method != "full" and hold_frozen_in_precision else torch.float32
        model = modeling.load_model(model_dir, attn, frozen)
        if cfg.gradient_checkpointing:
            modeling.enable_gradient_checkpointing(model)
    if method == "full":
        return model, None, modeling.set_trainable(model, "all")
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=cfg.lora_target_modules or "all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg, autocast_adapter_dtype=True)
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return peft_model.get_base_model(), peft_model, n


def save_adapter(peft_model: Any, out_dir: PathLike, base_name: str | None, template: str,
                 weights: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json (peft's layout), naming the model it applies to,
    and the chat template it was trained with (chat_template.jinja).

    ``weights``: the trained model's full state dict in the Hugging Face model's names (what the engine
    exports, gathered from the shards under FSDP2 / ZeRO-3); peft picks the adapter's tensors from it.
    None reads them from ``peft_model`` (unsharded training only).
    """
    state = None if weights is None else {f"base_model.model.{k}": v for k, v in weights.items()}
    with atomic_path(out_dir) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card template
        conf = read_json(tmp / ADAPTER_CONFIG)
        conf["base_model_name_or_path"] = base_name
        (tmp / ADAPTER_CONFIG).write_text(dumps_json(conf), encoding="utf-8")


def adapter_deltas(adapter_dir: PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Weight name in the model → (A, B, scaling) from a saved peft LoRA adapter."""
    from safetensors.torch import load_file

    conf = read_json(Path(adapter_dir) / ADAPTER_CONFIG)
    if conf.get("peft_type") != "LORA" or conf.get("fan_in_fan_out") or conf.get("use_dora"):
        raise ValueError(f"{adapter_dir}: only plain LoRA adapters (no DoRA, no fan_in_fan_out) can be merged")
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: per-module rank/alpha patterns are not supported")
    r, alpha = conf["r"], conf["lora_alpha"]
    scaling = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        out[f"{module}.weight"] = (a, tensors[key.replace(".lora_A.", ".lora_B.")], scaling)
    if not out or len(out) * 2 != len(tensors):
        raise ValueError(f"{adapter_dir}: expected lora_A/lora_B pairs only, found {sorted(tensors)[:4]}...")
    return out


def merge_adapter(model_dir: PathLike, adapter_dir: PathLike, out_dir: PathLike) -> int:
    """Write ``model_dir`` with the adapter merged into its weights to ``out_dir``; returns tensors merged."""
    model_dir = Path(model_dir)
    deltas = adapter_deltas(adapter_dir)
    merged: set[str] = set()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for rel in weight_files(model_dir):
            st = read_header(model_dir / rel)
            meta = json.loads(st.header).get("__metadata__") or {"format": "pt"}

            def produce(name: str, path: Path = st.path) -> torch.Tensor:
                w = read_tensor(path, name)
                if name not in deltas:
                    return w
                a, b, scaling = deltas[name]
                merged.add(name)
                return (w.float() + (b.float() @ a.float()) * scaling).to(w.dtype)

            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            write_st(tmp / rel, [(t.name, t.dtype, t.shape, t.end - t.begin) for t in st.tensors], meta, produce)
        missing = sorted(set(deltas) - merged)
        if missing:
            raise ValueError(f"{adapter_dir}: adapter targets weights {missing[:3]} that {model_dir} does not have")
        for rel in model_files(model_dir):
            if not rel.endswith(".safetensors"):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(model_dir / rel, tmp / rel)
    return len(merged)
