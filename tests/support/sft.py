"""Helpers shared by the SFT tests (tests/sft/): the real Firefly conversations, a tiny chat model, packed data."""

import json
import shutil
from pathlib import Path

from conftest import DEMO, tiny_llama

FIREFLY = DEMO / "sft" / "firefly_dummy_data.jsonl"  # 33 real multi-turn conversations (MOSS-003 via Firefly)
TOKENIZER = DEMO / "tokenizer"  # Mistral v0.3's tokenizer, with its own [INST] chat template


def firefly_lines() -> list[str]:
    return [line for line in FIREFLY.read_text(encoding="utf-8").splitlines() if line.strip()]


def firefly_messages() -> list[list[dict[str, str]]]:
    """The conversations as role/content messages, read here independently of cptflow.sft.formats."""
    out = []
    for line in firefly_lines():
        msgs = []
        for turn in json.loads(line)["conversation"]:
            msgs += [{"role": "user", "content": turn["human"]}, {"role": "assistant", "content": turn["assistant"]}]
        out.append(msgs)
    return out


def make_chat_model(path: Path, layers: int = 2) -> Path:
    """A random tiny LLaMA over the demo tokenizer's 32768 ids, saved with that tokenizer."""
    tiny_llama(layers=layers, heads=4, kv_heads=2, max_positions=1024, lm_head_scale=20.0).save_pretrained(str(path))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, path / f.name)
    return path


def write_conversations(path: Path, messages: list[list[dict[str, str]]]) -> Path:
    """A conversations-stage output file (the format sft_pack reads)."""
    path.write_text("".join(json.dumps({"id": f"firefly/dummy:{i + 1}", "source": "firefly", "messages": m},
                                       ensure_ascii=False) + "\n" for i, m in enumerate(messages)), encoding="utf-8")
    return path
