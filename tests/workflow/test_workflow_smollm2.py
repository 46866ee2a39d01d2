"""The whole DAG on a real pretrained model: SmolLM2-135M from its GGUF file (tests/configs/smollm2_tiny.yaml).

intake (dequantize) → continued BPE expansion → init → embed_align (new rows only) → full → delta round
trip → evaluate base and adapted on a handful of questions → report; and the SFT branch (2 LoRA steps on the
real Firefly conversations). Checks what only a real model shows: base rows survive real training steps bit for
bit, Chinese gets cheaper to encode, the release rebuilds; SFT trains in SmolLM2's own ChatML template through
the expanded byte-level BPE, with the loss on the replies only and LoRA on every linear layer of the real blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("smollm2")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(REPO / "tests" / "configs" / "smollm2_tiny.yaml"),
           "--profile", str(REPO / "profiles" / "local")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if proc.returncode != 0:
        logs = sorted((work / "results").rglob("*.log"), key=lambda p: p.stat().st_mtime)
        tail = "\n".join(f"== {p}\n{p.read_text()[-1500:]}" for p in logs[-3:])
        raise AssertionError(f"snakemake failed:\n{(proc.stdout + proc.stderr)[-5000:]}\n{tail}")
    return work / "results" / "smollm2_tiny"


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_real_model_flows_through_every_stage(smollm2_run):
    run = smollm2_run
    base = json.loads((run / "model" / "base.stats.json").read_text())
    assert (base["source_kind"], base["n_params"], base["tokenizer_kind"]) == ("gguf", 134_515_008, "byte_bpe")
    init = json.loads((run / "model" / "init.stats.json").read_text())
    n_base, added = init["counts"]["vocab_base"], init["counts"]["rows_added"]
    assert n_base == 49_152 and 0 < added <= 300 and init["byte_level_bpe"] is True
    # embed_align trained only the new rows: every SmolLM2 row, and the whole body, bit for bit
    before, after = _weights(run / "model" / "init"), _weights(run / "train" / "embed_align" / "model")
    assert before.keys() == after.keys() and "lm_head.weight" not in after  # tied, as the base
    emb = "model.embed_tokens.weight"
    assert torch.equal(after[emb][:n_base], before[emb][:n_base])
    assert not torch.equal(after[emb][n_base:], before[emb][n_base:])
    assert all(torch.equal(after[k], before[k]) for k in before if k != emb)
    # the full stage moved the body
    full = _weights(run / "train" / "full" / "model")
    assert not torch.equal(full["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    # Chinese is cheaper to encode, English untouched; the base and every stage scored
    table = json.loads((run / "eval" / "compare.json").read_text())
    assert table["models"] == ["base", "embed_align", "full", "sft"]
    ev = {m: json.loads((run / "eval" / f"{m}.json").read_text()) for m in ("base", "full")}
    zh = [ev[m]["heldout"]["zh"]["tokens_per_char"] for m in ("base", "full")]
    en = [ev[m]["heldout"]["en"]["tokens_per_char"] for m in ("base", "full")]
    assert zh[1] < zh[0] and en[0] == en[1]
    assert ev["base"]["benchmarks"]["mmlu"]["overall"]["n"] == 2
    # the release delta rebuilt the adapted model and checked every file
    assert json.loads((run / "release" / "roundtrip.stats.json").read_text())["counts"]["files_verified"] >= 3
    assert (run / "report" / "summary.md").is_file()


def test_sft_uses_the_real_models_template_masks_replies_and_adapts_every_linear_layer(smollm2_run):
    from cptflow.model.hf import load_tokenizer
    from cptflow.sft import packed

    run = smollm2_run
    counts = json.loads((run / "sft" / "pack" / "counts.json").read_text())
    template = (run / "sft" / "pack" / "chat_template.jinja").read_text(encoding="utf-8")
    assert counts["conversations"] == 33 and "<|im_start|>" in template  # SmolLM2's ChatML, kept through vocab
    assert counts["chat_template_origin"] in ("tokenizer", "base tokenizer")
    # the loss covers replies and their <|im_end|> only: every masked span is (the start of) an assistant turn
    assistants = [t["assistant"] for line in (REPO / "workflow/resources/demo/sft/firefly_dummy_data.jsonl")
                  .read_text(encoding="utf-8").splitlines() if line.strip() for t in json.loads(line)["conversation"]]
    tok = load_tokenizer(run / "train" / "full" / "model")
    ds, length = packed.open_rows(run / "sft" / "pack" / "data")
    batch = packed.load_rows(ds, np.arange(min(len(ds), 4)), length)
    spans = 0
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        on = np.flatnonzero(labels != -100)
        for span in np.split(on, np.flatnonzero(np.diff(on) > 1) + 1):
            text = tok.decode(ids[span].tolist(), skip_special_tokens=False)
            core = text.removesuffix("<|im_end|>\n").rstrip("\ufffd")  # a reply cut at max_length may end mid-character
            assert "<|im_start|>" not in text and core and any(a.startswith(core) for a in assistants), text[:200]
            spans += 1
    assert spans >= 4
    # LoRA on every linear layer of SmolLM2's blocks (not lm_head), merged and released with the template
    adapter = json.loads((run / "release" / "sft" / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    summary = json.loads((run / "sft" / "finetune.stats.json").read_text())["summary"]
    assert summary["method"] == "lora" and summary["total_steps"] == 2
    assert json.loads((run / "release" / "sft" / "release.json").read_text())["chat_template"] == template
    assert json.loads((run / "sft" / "model" / "tokenizer_config.json").read_text())["chat_template"] == template
    answers = json.loads((run / "sft" / "generations.json").read_text())["answers"]
    assert "sft" in answers and all(len(a) == 2 for a in answers.values())
    assert json.loads((run / "eval" / "compare.json").read_text())["models"][-1] == "sft"
