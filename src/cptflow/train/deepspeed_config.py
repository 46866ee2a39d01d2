"""DeepSpeed ZeRO configs: the json a stage names, with its "auto" entries filled from the stage config.

Batch sizes, clipping and precision are set once, in the stage config; a ZeRO json that sets them to
something else is an error naming the key, never a silent disagreement.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


def fill_deepspeed_config(raw: dict[str, Any], values: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill a ZeRO json's "auto" entries from the stage config; a conflicting explicit value is an error.

    ``values`` maps dotted keys (``bf16.enabled``) to what the stage config implies, so batch sizes,
    clipping and precision are set in one place (the stage config), never twice.
    """
    cfg = copy.deepcopy(raw)
    for dotted, value in values.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if leaf in node and node[leaf] != "auto" and node[leaf] != value:
            raise ValueError(f"{where}: {dotted} = {node[leaf]!r} conflicts with the stage config ({value!r}); "
                             f'set it to "auto"')
        node[leaf] = value
    # We pass a torch AdamW in; without this DeepSpeed refuses it under ZeRO (and never JIT-builds CPU Adam).
    cfg["zero_allow_untested_optimizer"] = True
    return cfg


def deepspeed_values(cfg: Any, micro: int, accum: int, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": float(cfg.grad_clip or 0.0),
        "bf16.enabled": cfg.precision == "bf16",
        "fp16.enabled": cfg.precision == "fp16",
    }


def load_deepspeed_config(path: str | Path, cfg: Any, micro: int, accum: int, world: int) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"deepspeed: config file {p} not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from e
    return fill_deepspeed_config(raw, deepspeed_values(cfg, micro, accum, world), str(p))


def zero3_load_context(ds_config: dict[str, Any]) -> Any:
    """Under ZeRO-3, make ``from_pretrained`` partition weights while loading (keep the object alive).

    Without it every rank would first materialise the whole model in CPU memory.
    """
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)
