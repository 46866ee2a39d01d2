"""Fixtures of the model tests: the real SmolLM2-135M GGUF, taken in once per session, and tiny HF models."""

from __future__ import annotations

import json

import pytest

from support.models import run_stage, smollm2_gguf


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SmolLM2-135M through the base_model stage, in its own process as the workflow runs it (dequantizing
    takes 15-45 s: once per session)."""
    root = tmp_path_factory.mktemp("smollm2")
    src = smollm2_gguf()
    run_stage("cptflow.model.base_model", "--source", str(src), "--output-dir", str(root / "base"),
              "--stats", str(root / "base.stats.json"))
    return {"gguf": src, "base": root / "base", "manifest": json.loads((root / "base.stats.json").read_text()),
            "root": root}
