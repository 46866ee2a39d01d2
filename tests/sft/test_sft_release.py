"""sft_release: the SFT model released as a delta against the public base (vocabulary-aware, rebuilt bit for bit by
the `cptflow` command a user runs) and as the adapter alone, with the chat template and its hash recorded."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cptflow.release.delta_scheme import DeltaConfig
from cptflow.sft import finetune, sft_pack, sft_release
from cptflow.sft.config import FinetuneConfig
from cptflow.sft.template import template_sha256
from support.sft import TOKENIZER, firefly_messages, make_chat_model, write_conversations


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_release_rebuilds_the_sft_model_from_the_base_and_ships_the_adapter(tmp_path):
    base = make_chat_model(tmp_path / "base", layers=1)
    # the CPT model: vocabulary grown by 64 rows and every weight moved, as continual pre-training leaves it
    cpt = tmp_path / "cpt"
    m = AutoModelForCausalLM.from_pretrained(str(base))
    m.resize_token_embeddings(32768 + 64)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.save_pretrained(str(cpt))
    for f in TOKENIZER.iterdir():
        shutil.copy(f, cpt / f.name)
    src = write_conversations(tmp_path / "c.jsonl", firefly_messages()[:8])
    sft_pack.run(sft_pack.SftPackConfig(max_length=128), cpt, [src], tmp_path / "data", tmp_path / "t.jinja",
                 tmp_path / "counts.json")
    out = tmp_path / "sft"
    paths = finetune.FinetunePaths(cpt, tmp_path / "data", tmp_path / "t.jinja", out / "model", out / "ckpt",
                                   out / "metrics.jsonl", out / "finetune.stats.json", out / "adapter")
    finetune.run(FinetuneConfig(precision="fp32", micro_batch_size=2, max_steps=2, lora_r=4, lr=1e-2), paths)

    rel = tmp_path / "release" / "sft"
    assert sft_release.main(["--base", str(base), "--model", str(paths.output_dir), "--adapter", str(paths.adapter_dir),
                             "--template", str(tmp_path / "t.jinja"), "--finetune-stats", str(paths.stats),
                             "--output-dir", str(rel), "--stats", str(tmp_path / "release" / "sft.stats.json")]) == 0
    assert sorted(p.name for p in rel.iterdir()) == ["adapter", "delta", "release.json"]
    assert files(rel / "adapter") == files(paths.adapter_dir)
    template = (tmp_path / "t.jinja").read_text(encoding="utf-8")
    manifest = json.loads((rel / "release.json").read_text())
    assert manifest["chat_template"] == template and manifest["chat_template_sha256"] == template_sha256(template)
    assert manifest["method"] == "lora" and manifest["start_model"] == str(cpt)
    stats = json.loads((tmp_path / "release" / "sft.stats.json").read_text())
    assert stats["counts"]["files_verified"] == len(files(paths.output_dir))
    assert stats["counts"]["delta/tensors_expanded"] == 2  # embed_tokens and lm_head grew
    # what a user of the release runs: the installed command, on the base they hold
    rebuilt = tmp_path / "rebuilt"
    cptflow = Path(sys.executable).parent / "cptflow"
    proc = subprocess.run([str(cptflow), "delta", "apply", "--base", str(base), "--delta", str(rel / "delta"),
                           "--output", str(rebuilt)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert files(rebuilt) == files(paths.output_dir)  # bit for bit, template in tokenizer_config.json included
    assert json.loads((rebuilt / "tokenizer_config.json").read_text())["chat_template"] == template


def test_a_full_fine_tuning_release_has_no_adapter(tmp_path):
    model = make_chat_model(tmp_path / "m", layers=1)
    (tmp_path / "t.jinja").write_text("{{ bos_token }}", encoding="utf-8")
    stats, manifest = sft_release.release(DeltaConfig(), model, model, tmp_path / "rel", "{{ bos_token }}")
    assert manifest["adapter"] is None and not (tmp_path / "rel" / "adapter").exists()
    assert stats["files_verified"] == len(files(model))
