"""The one way cptflow reads a model: every stage, the workflow and the ``cptflow`` command load through here.

``load_causal_lm`` is the only place in ``src/`` that calls a model class's ``from_pretrained``
(tests/model/test_loader.py scans the source to keep it so). What it guarantees:

* **safetensors only** (``use_safetensors=True``): ``.bin``/``.pt`` checkpoints are pickles and can
  run code when loaded; a directory with only those is refused, naming the files and the fix;
* **no remote code**: a config.json or tokenizer_config.json with ``auto_map`` (custom modelling
  code shipped as .py files) is refused before transformers sees it, and ``trust_remote_code=False``;
* **local files only** (``local_files_only=True``): a typo in a path never turns into a download;
* **nothing silently random**: transformers fills every tensor missing from the checkpoint with a
  fresh random init and only prints a report. A directory whose weights do not cover the model its
  config describes (a stray shard set, a config from another size) would be scored or trained as a
  partly random model; here missing, unexpected or mis-shaped tensors are an error naming the model.

Headers are checked (``safetensors_header.read_header``) before loading, so a truncated shard fails
with its name rather than deep inside transformers. ``load_gguf`` is the one GGUF reader (base
model intake only): transformers dequantizes the file with the ``gguf`` package.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cptflow.core.io import PathLike
from cptflow.model.safetensors_header import read_header, weight_files

#: Weight files that are pickles: never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = ("float32", "bfloat16", "float16")
log = logging.getLogger("cptflow.model.loader")


def read_config(model_dir: PathLike) -> dict[str, Any]:
    """config.json of a model directory, refusing remote code (``auto_map``) with the file named."""
    p = Path(model_dir)
    path = p / "config.json"
    if not path.is_file():
        raise ValueError(f"{p}: not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    for name in ("config.json", "tokenizer_config.json"):
        f = p / name
        try:
            conf = cfg if name == "config.json" else (json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {})
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        if isinstance(conf, dict) and conf.get("auto_map"):
            code = sorted(q.name for q in p.glob("*.py"))
            raise ValueError(f"{f}: auto_map names custom modelling code ({', '.join(code) or 'remote .py files'}); "
                             "cptflow never runs code shipped with a model (trust_remote_code is off). Use a model "
                             "whose architecture transformers implements itself (model_type in config.json).")
    if cfg.get("quantization_config"):
        kind = cfg["quantization_config"].get("quant_method", "?") if isinstance(cfg["quantization_config"], dict) \
            else "?"
        raise ValueError(f"{path}: a quantized checkpoint ({kind}); cptflow trains from float weights: use the "
                         "unquantized base (a .gguf file is dequantized by the base_model stage)")
    return cfg


def check_model_dir(path: PathLike) -> Path:
    """Return ``path`` if it is a loadable model directory; else raise ValueError naming what is wrong.

    Needs config.json (no remote code, not quantized) and complete, untruncated safetensors weights.
    The error for a pickle-only directory names the files and the fix, because the usual cause is an
    old checkpoint, not a mistake in the config.
    """
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p}: model directory not found")
    read_config(p)
    try:
        files = weight_files(p)
    except ValueError:
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{p}: weights are pickle files ({', '.join(pickles)}); cptflow never unpickles weights "
                "(loading a pickle can run arbitrary code). Convert them once, in a trusted environment, with "
                "model.save_pretrained(dir, safe_serialization=True) and point base_model.path there.") from None
        raise ValueError(f"{p}: no weights (no *.safetensors file); a model directory needs config.json and its "
                         "safetensors weights") from None
    for rel in files:
        read_header(p / rel)  # a truncated shard fails here, naming it
    return p


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` → ``torch.bfloat16``; only the three training dtypes are accepted."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def check_loading_info(where: PathLike, info: dict[str, Any]) -> None:
    """Fail unless every tensor of the model came from the checkpoint and every checkpoint tensor was used."""
    problems = []
    for key, what in (("missing_keys", "missing from the weights (would be random)"),
                      ("unexpected_keys", "in the weights but not in the model config.json describes"),
                      ("mismatched_keys", "shaped differently from config.json")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if keys:
            problems.append(f"{len(keys)} tensor(s) {what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    if problems:
        raise ValueError(f"{where}: weights and config.json disagree: " + "; ".join(problems))


def load_causal_lm(path: PathLike, dtype: Any = "auto", *, device: Any = None,
                   attn_implementation: str | None = None, quantization_config: Any = None,
                   device_map: Any = None) -> Any:
    """Load a causal LM in eval mode: checked safetensors, no remote code, local files, every tensor loaded.

    ``dtype``: "auto" keeps the stored dtype; a name ("bfloat16") or a ``torch.dtype`` converts.
    ``device``: where the weights go (None: CPU); ``attn_implementation``: "sdpa", "eager", ...
    ``quantization_config`` + ``device_map``: a quantized load (SFT's QLoRA: bitsandbytes 4-bit, placed by
    transformers as it loads; such a model is never moved afterwards).
    """
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = torch_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": False,
                              "local_files_only": True, "output_loading_info": True}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=device_map)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(p), **kwargs)
    except (OSError, RuntimeError, KeyError) as e:  # transformers' own errors: name the model, keep the reason
        raise ValueError(f"{p}: transformers could not load the model: {e}") from e
    check_loading_info(p, info)
    if device is not None:
        model = model.to(device)
    return model.eval()


def check_gguf(path: PathLike) -> dict[str, Any]:
    """Read a GGUF file's header and tensor table; a truncated or foreign file is an error naming it.

    Returns ``{"architecture", "n_params", "tensor_types", "license"}``. Reading is cheap (the
    ``gguf`` package memory-maps the file and dequantizes nothing).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: GGUF file not found")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{p}: not a GGUF file (no GGUF magic at the start)")
    try:
        import gguf
    except ImportError as e:  # a declared dependency; say which
        raise ValueError(f"{p}: reading GGUF needs the gguf package (pip install -c constraints.txt gguf)") from e
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(str(p))
        tensors = list(reader.tensors)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in tensors)
    except Exception as e:  # noqa: BLE001 (the reader fails in numpy on cut files: any failure means a bad file)
        raise ValueError(f"{p}: truncated or corrupt GGUF file ({type(e).__name__}: {e}); download it again") from e
    if end > size:
        raise ValueError(f"{p}: truncated GGUF file (tensor data ends at byte {end}, the file has {size})")

    def field(name: str) -> Any:
        fld = reader.fields.get(name)
        return None if fld is None else bytes(fld.parts[fld.data[0]]).decode("utf-8", "replace")

    types: dict[str, int] = {}
    for t in tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"architecture": field("general.architecture"), "license": field("general.license"),
            "n_params": sum(int(t.n_elements) for t in tensors), "tensor_types": dict(sorted(types.items()))}


def load_gguf(path: PathLike, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) dequantized from a GGUF file by transformers, in ``dtype``.

    The returned model still carries its GGUF quantization config (``save_pretrained`` refuses it):
    base model intake writes its state dict and a cleaned config itself.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    check_gguf(p)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch_dtype(dtype),
                                                     trust_remote_code=False, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, trust_remote_code=False,
                                            local_files_only=True)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"{p}: transformers could not read this GGUF file: {e}") from e
    return model.eval(), tok
