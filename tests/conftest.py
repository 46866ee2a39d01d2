"""Shared test fixtures: paths to the repo's own data (tests never need ../shared)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "workflow" / "resources" / "demo"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    return DEMO


def read_texts(path: Path, n: int | None = None) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if n is not None and len(out) >= n:
                break
    return out


def schema_section(name: str) -> dict:
    """The JSON-Schema of one config section, from the one config/schema.yaml."""
    import yaml

    return yaml.safe_load((REPO / "config" / "schema.yaml").read_text(encoding="utf-8"))["properties"][name]
