"""Stage base_model: intake of a GGUF file (the real SmolLM2-135M) and of Hugging Face directories, and every
kind of bad base refused with a message naming the file."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from cptflow.core.io import sha256_file
from cptflow.model import base_model
from cptflow.model.base_check import check_source
from cptflow.model.hf import load_tokenizer
from cptflow.model.loader import load_causal_lm
from support.models import smollm2_gguf, tiny_hf


def intake(src: Path, out: Path, **params) -> dict:
    rc = base_model.main(["--source", str(src), "--output-dir", str(out), "--stats", f"{out}.stats.json",
                          "--params", json.dumps(params)])
    assert rc == 0
    return json.loads(Path(f"{out}.stats.json").read_text())


def test_gguf_intake_of_the_real_smollm2(smollm2):
    """Dequantized SmolLM2-135M: the published shape, a cleaned config, and a real English model."""
    m, base = smollm2["manifest"], smollm2["base"]
    assert (m["n_params"], m["vocab_size"], m["tie_word_embeddings"]) == (134_515_008, 49_152, True)
    assert (m["source_kind"], m["dtype"], m["tokenizer_kind"], m["architecture"]) == \
        ("gguf", "float32", "byte_bpe", "LlamaForCausalLM")
    assert m["gguf"]["license"] == "apache-2.0" and m["gguf"]["tensor_types"]["Q4_1"] > 200
    assert m["files"]["model.safetensors"] == sha256_file(base / "model.safetensors")
    cfg = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    weights = load_file(base / "model.safetensors")
    assert "lm_head.weight" not in weights and all(v.dtype == torch.float32 for v in weights.values())
    model, tok = load_causal_lm(base), load_tokenizer(base)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again on load
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 3.0, loss  # a trained English model (a random one: ln 49152 = 10.8 nats per token)


@pytest.mark.parametrize("variant", ["sharded_fp32_untied", "bf16_tied", "fp16_untied"])
def test_hf_directory_intake_keeps_files_byte_for_byte(variant, tmp_path):
    dtype = {"sharded_fp32_untied": "float32", "bf16_tied": "bfloat16", "fp16_untied": "float16"}[variant]
    tied = "tied" in variant and "untied" not in variant
    src = tiny_hf(tmp_path / "src", tied=tied, dtype=dtype, shard="400KB" if "sharded" in variant else None)
    (src / "pytorch_model.bin").write_bytes(b"an old pickle, never opened")  # next to safetensors: left behind
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert (len(shards) > 1) == ("sharded" in variant)
    m = intake(src, tmp_path / "base")
    out = tmp_path / "base"
    index = ["model.safetensors.index.json"] if len(shards) > 1 else []
    for name in shards + ["config.json", "tokenizer.model"] + index:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists()
    ref = load_causal_lm(src)
    assert m["n_params"] == sum(p.numel() for p in ref.parameters())  # tied: the shared matrix once
    assert (m["dtype"], m["stored_dtype"], m["tie_word_embeddings"], m["tokenizer_kind"], m["linked"]) == \
        (dtype, dtype, tied, "sentencepiece", True)
    ids = torch.tensor([[1, 500, 2000, 31000]])
    with torch.no_grad():
        assert torch.equal(load_causal_lm(out)(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_dtype_conversion_streams_each_tensor(tmp_path):
    src = tiny_hf(tmp_path / "src", shard="400KB")
    m = intake(src, tmp_path / "base", dtype="bfloat16")
    assert (m["stored_dtype"], m["dtype"], m["linked"]) == ("float32", "bfloat16", False)
    before = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in (tmp_path / "base").glob("*.safetensors") for k, v in load_file(f).items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(after[k], before[k].to(torch.bfloat16)) for k in before)
    assert json.loads((tmp_path / "base" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_causal_lm(tmp_path / "base").dtype == torch.bfloat16


# ---- bad input: each fails with the file named and what to do ------------------------------------------


def _fails(src: Path, out: Path, *needles: str) -> str:
    with pytest.raises(ValueError) as e:
        base_model.run(base_model.BaseModelConfig(), src, out)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    assert not out.exists()
    return msg


def test_no_weights(tmp_path):
    src = tiny_hf(tmp_path / "src")
    for f in src.glob("*.safetensors"):
        f.unlink()
    _fails(src, tmp_path / "out", str(src), "no weights")


def test_bin_only_is_refused_without_unpickling(tmp_path):
    src = tiny_hf(tmp_path / "src")
    for f in src.glob("*.safetensors"):
        f.unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that would run code")
    _fails(src, tmp_path / "out", "pytorch_model.bin", "pickle", "save_pretrained")


def test_config_and_weight_shapes_that_disagree(tmp_path):
    src = tiny_hf(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    _fails(src, tmp_path / "out", "model.layers.0.mlp.up_proj.weight in model.safetensors has shape [32, 16]",
           "config.json implies [48, 16]")


def test_missing_and_foreign_tensors(tmp_path):
    src = tiny_hf(tmp_path / "src")
    w = load_file(src / "model.safetensors")
    del w["model.layers.1.self_attn.q_proj.weight"]
    w["vision_tower.proj.weight"] = torch.zeros(2, 2)
    save_file(w, src / "model.safetensors", metadata={"format": "pt"})
    _fails(src, tmp_path / "out", "model.layers.1.self_attn.q_proj.weight is missing", "vision_tower.proj.weight")


def test_truncated_shard(tmp_path):
    src = tiny_hf(tmp_path / "src", shard="400KB")
    shard = sorted(src.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    _fails(src, tmp_path / "out", str(shard), "truncated")


def test_remote_code_is_refused(tmp_path):
    src = tiny_hf(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "modeling_x.XModel"}}))
    (src / "modeling_x.py").write_text("import os  # would run at load time with trust_remote_code\n")
    _fails(src, tmp_path / "out", str(src / "config.json"), "modeling_x.py", "trust_remote_code")


def test_tokenizer_larger_than_the_embedding(tmp_path):
    src = tiny_hf(tmp_path / "src", vocab=1000)  # the demo tokenizer has 32768 tokens
    _fails(src, tmp_path / "out", "32768 tokens", "vocab_size is 1000")


def test_truncated_gguf(tmp_path):

    data = smollm2_gguf().read_bytes()
    for name, cut in (("half.gguf", len(data) // 2), ("head.gguf", 4096), ("tail.gguf", len(data) - 10)):
        (tmp_path / name).write_bytes(data[:cut])
        _fails(tmp_path / name, tmp_path / f"out_{name}", str(tmp_path / name), "GGUF")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
    _fails(tmp_path / "fake.gguf", tmp_path / "out_fake", "not a GGUF file")


def test_workflow_start_check_names_the_key(tmp_path):
    src = tiny_hf(tmp_path / "src")
    assert check_source(src) == "hf"
    for bad, needle in ((tmp_path / "nowhere", "no such file"), (src / "config.json", "neither"),
                        (tmp_path / "x.gguf", "no such file")):
        with pytest.raises(ValueError, match="base_model.path") as e:
            check_source(bad)
        assert needle in str(e.value)
    (src / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="base_model.path.*no weights"):
        check_source(src)


@pytest.mark.slow
def test_snakemake_fails_at_start_on_a_bad_path_and_sizes_jobs_from_the_model(tmp_path):
    """Real snakemake: a bad base_model.path stops the dry run before any job; a good one sizes the jobs."""
    cfg = tmp_path / "cfg.yaml"
    base = (REPO / "tests" / "configs" / "tiny.yaml").read_text()
    cfg.write_text(base.replace("base_model:\n", f"base_model:\n  path: {tmp_path / 'nowhere'}\n", 1))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(cfg), "--dry-run", "--cores", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "base_model.path" in said and "no such file" in said, said[-2000:]
    assert "rule ingest" not in said
    model = tiny_hf(tmp_path / "mymodel", shard="400KB")
    cfg.write_text(base.replace("base_model:\n", f"base_model:\n  path: {model}\n", 1))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "rule bootstrap" not in out and "rule base_model" in out
    block = out[out.index("rule base_model"):][:1500]
    assert f"input: {model}" in block
    from cptflow.model.sizing import model_size, stage_resources

    want = stage_resources("base_model", model_size(model))
    assert f"mem_mb={want['mem_mb']}" in block and f"runtime={want['runtime']}" in block
    assert math.isclose(model_size(model).n_params, sum(
        p.numel() for p in load_causal_lm(model).parameters()))
    shutil.rmtree(model)


def test_smollm2_config_validates_and_finds_its_model():
    import yaml

    from cptflow.core.config import from_dict
    from cptflow.core.schema import validate_with_defaults
    from cptflow.model.base_check import resolve_path

    cfg = validate_with_defaults(yaml.safe_load((REPO / "config" / "smollm2.yaml").read_text(encoding="utf-8")))
    from_dict(base_model.BaseModelConfig, cfg["base_model"], "base_model")
    assert Path(resolve_path(cfg["base_model"]["path"])) == smollm2_gguf()
    assert check_source(resolve_path(cfg["base_model"]["path"])) == "gguf"
    with pytest.raises(ValueError, match="no installed package 'no_such_pkg'"):
        resolve_path("pkg:no_such_pkg/model.gguf")
