"""cptflow.model.loader: the one safe way to read a model, enforced over the source tree, and what it refuses."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import DEMO, REPO
from cptflow.eval import evaluate
from cptflow.model import modeling
from cptflow.model.loader import load_causal_lm
from support.models import tiny_hf

SRC = REPO / "src" / "cptflow"
LOADER = SRC / "model" / "loader.py"


def _receiver(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def test_only_the_loader_reads_models():
    """No module but cptflow/model/loader.py calls a model class's from_pretrained (or unpickles a file)."""
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            name, owner = node.func.attr, _receiver(node.func.value)
            is_model = "Model" in owner or owner.endswith(("ForCausalLM", "LM"))
            if name in ("from_pretrained", "from_single_file") and is_model and path != LOADER:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {owner}.{name}")
            if name == "load" and owner == "torch":
                safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: torch.load without weights_only=True")
    assert offenders == []


def _bin_only(tmp_path: Path) -> Path:
    model = tiny_hf(tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(weights, model / "pytorch_model.bin")  # what an old checkpoint looks like
    return model


def test_evaluate_refuses_a_bin_only_model_instead_of_scoring_random_weights(tmp_path):
    """The issue-14 case: `evaluate` on a directory with only pytorch_model.bin used to load it with every
    tensor missing and write the scores of a randomly initialised model."""
    model = _bin_only(tmp_path)
    out = tmp_path / "base.json"
    rc = evaluate.main(["--model", str(model), "--name", "base", "--heldout", f"en={DEMO / 'heldout/en.jsonl'}",
                        "--output", str(out), "--params", json.dumps({"max_heldout_docs": 1})])
    assert rc == 2 and not out.exists()
    proc = subprocess.run([str(Path(sys.executable).parent / "cptflow"), "eval", "--model", str(model),
                           "--heldout", f"en={DEMO / 'heldout/en.jsonl'}"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "pytorch_model.bin" in proc.stderr and "pickle" in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="pickle"):
        modeling.load_model(model, "sdpa")


def test_a_tensor_missing_from_the_weights_is_an_error_not_a_random_init(tmp_path):
    model = tiny_hf(tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.0.mlp.down_proj.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) missing from the weights.*down_proj"):
        load_causal_lm(model)


def test_remote_code_in_the_tokenizer_config_is_refused(tmp_path):
    model = tiny_hf(tmp_path / "m")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tok.MyTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="tokenizer_config.json: auto_map"):
        load_causal_lm(model)


def test_loads_in_the_requested_dtype_and_keeps_the_stored_one_by_default(tmp_path):
    model = tiny_hf(tmp_path / "m", dtype="bfloat16", tied=True)
    assert load_causal_lm(model).dtype == torch.bfloat16
    m32 = load_causal_lm(model, "float32")
    assert m32.dtype == torch.float32 and not m32.training
    assert m32.lm_head.weight is m32.model.embed_tokens.weight
