"""Helpers of the release tests (tests/release/): tiny base and adapted models with an expanded vocabulary."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


TOKENIZER = Path(__file__).resolve().parents[2] / "workflow/resources/demo/tokenizer"


BASE_VOCAB = 32768


NEW_TOKENS = 100  # adapted vocabulary = base + 100, padded to a multiple of 64 → 32896 rows


def tiny(seed: int, dtype: torch.dtype, hidden: int = 32) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def adapt(model: LlamaForCausalLM, seed: int) -> LlamaForCausalLM:
    """An 'adapted' model: vocabulary expanded (padded to 64) and every weight moved a little."""
    model.resize_token_embeddings(BASE_VOCAB + NEW_TOKENS, pad_to_multiple_of=64, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype))
    return model


def save(model: LlamaForCausalLM, tok, path: Path, shard: str | None = None) -> Path:
    model.save_pretrained(path, max_shard_size=shard or "50GB")
    tok.save_pretrained(path)
    return path


def same_dirs(a: Path, b: Path) -> None:
    fa = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    fb = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert fa == fb
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
