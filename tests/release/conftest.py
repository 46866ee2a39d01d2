"""Fixtures of the release tests: the demo tokenizer and bf16/fp32 base/adapted model pairs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from support.release import TOKENIZER, adapt, save, tiny


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """bf16 and fp32 base/adapted pairs; adapted saved single-file and sharded."""
    root = tmp_path_factory.mktemp("models")
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        save(tiny(0, dtype), tokenizer, root / f"base_{name}")
        adapted = adapt(tiny(0, dtype), seed=1)
        save(adapted, tokenizer, root / f"adapted_{name}_single")
        save(adapted, tokenizer, root / f"adapted_{name}_sharded", shard="1MB")
    return root
