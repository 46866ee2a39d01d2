"""cptflow.model.bootstrap: a tiny English-pretrained LLaMA over the base tokenizer, saved as safetensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cptflow.model.bootstrap import BootstrapConfig, lr_at, main, read_texts, run
from cptflow.core.config import ConfigError, from_dict
from cptflow.model.hf import load_tokenizer
from cptflow.model.loader import load_causal_lm
from cptflow.core.io import sha256_path

DEMO = Path(__file__).resolve().parents[2] / "workflow" / "resources" / "demo"
TOKENIZER = DEMO / "tokenizer"
# A CI-sized model and budget: a couple of seconds on 2 cores.
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64, "max_position_embeddings": 64, "steps": 40, "seq_length": 32,
        "batch_size": 4, "lr": 0.01, "warmup_steps": 4, "num_threads": 1, "log_every": 10}


@pytest.fixture(scope="module")
def english(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 12 documents of one English demo file (~30k characters)."""
    src = DEMO / "corpus" / "en_replay" / "devils_dictionary.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines()[:12]
    path = tmp_path_factory.mktemp("en") / "en.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, english: Path) -> Path:
    out = tmp_path_factory.mktemp("boot")
    run(from_dict(BootstrapConfig, TINY), TOKENIZER, [english], out / "model", out / "model.stats.json",
        out / "loss.jsonl")
    return out


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    cfg = BootstrapConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_model_dir_has_safetensors_config_and_tokenizer(trained: Path) -> None:
    model_dir = trained / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "train_loss.jsonl"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert not [p for p in trained.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (32768, 32, 1)
    assert (cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (1, False)
    tok = load_tokenizer(model_dir)
    assert (len(tok), tok.bos_token_id, tok.eos_token_id) == (32768, 1, 2)
    model = load_causal_lm(model_dir)
    assert model.get_input_embeddings().weight.shape == (32768, 32)


def test_loss_starts_uniform_and_falls(trained: Path) -> None:
    curve = [json.loads(line) for line in (trained / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(1, 41))
    assert curve[0]["loss"] == pytest.approx(math.log(32768), abs=0.15)  # seeded init: near uniform
    final = sum(r["loss"] for r in curve[-5:]) / 5
    assert final < curve[0]["loss"] - 2.0
    assert (trained / "model" / "train_loss.jsonl").read_text() == (trained / "loss.jsonl").read_text()
    manifest = json.loads((trained / "model.stats.json").read_text())
    assert manifest["stage"] == "bootstrap" and manifest["counts"]["steps"] == 40
    assert manifest["counts"]["docs_in"] == 12
    assert manifest["loss_final"] == pytest.approx(sum(r["loss"] for r in curve[-10:]) / 10, abs=1e-5)


def test_same_seed_gives_byte_identical_model_through_cli(trained: Path, english: Path, tmp_path: Path) -> None:
    rc = main(["--tokenizer", str(TOKENIZER), "--train-text", str(english), "--output-dir", str(tmp_path / "m"),
               "--stats", str(tmp_path / "s.json"), "--params", json.dumps(TINY)])
    assert rc == 0
    assert sha256_path(tmp_path / "m") == sha256_path(trained / "model")


def test_other_seed_gives_other_weights(trained: Path, english: Path, tmp_path: Path) -> None:
    run(from_dict(BootstrapConfig, {**TINY, "seed": 1, "steps": 5}), TOKENIZER, [english], tmp_path / "m")
    a = load_causal_lm(tmp_path / "m").get_input_embeddings().weight
    b = load_causal_lm(trained / "model").get_input_embeddings().weight
    assert not bool((a == b).all())


def test_bad_input_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: .*'text'"):
        read_texts([bad])
    assert main(["--tokenizer", str(TOKENIZER), "--train-text", str(bad), "--output-dir",
                 str(tmp_path / "out"), "--params", json.dumps(TINY)]) == 2
    assert not (tmp_path / "out").exists()


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(BootstrapConfig, {"hidden": 64})
    with pytest.raises(ConfigError, match="divisible"):
        BootstrapConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="warmup_steps"):
        BootstrapConfig(steps=10, warmup_steps=10)
