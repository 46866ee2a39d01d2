"""One schema, every key documented, and the Python side agreeing with it.

The workflow validates the YAML against config/schema.yaml (filling defaults); each stage builds its
frozen dataclass from its section. These tests hold the two together: same keys, same defaults, every
key described, and the shipped configs valid.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from cptflow.model.bootstrap import BaseModelConfig
from cptflow.data.clean import CleanConfig
from cptflow.core.config import ConfigError, from_dict, to_dict
from cptflow.data.contamination import DecontaminateConfig
from cptflow.data.minhash import DedupConfig
from cptflow.release.delta_scheme import DeltaConfig
from cptflow.eval.evaluate import EvaluateConfig
from cptflow.tokenizer.vocab import VocabConfig
from cptflow.data.ingest import IngestConfig
from cptflow.model.init_model import InitModelConfig
from cptflow.pack.pack import PackConfig
from cptflow.data.pii import PiiConfig
from cptflow.core.schema import load_schema, validate_with_defaults
from cptflow.data.shards import ShardsConfig
from cptflow.train.config import TrainConfig

SECTIONS = {
    "ingest": IngestConfig, "clean": CleanConfig, "dedup": DedupConfig, "decontaminate": DecontaminateConfig,
    "pii": PiiConfig, "shards": ShardsConfig, "base_model": BaseModelConfig, "vocab": VocabConfig,
    "init_model": InitModelConfig, "pack": PackConfig, "train": TrainConfig, "delta": DeltaConfig,
    "evaluate": EvaluateConfig,
}
CONFIGS = sorted([REPO / "config" / "config.yaml", REPO / "config" / "demo.yaml", *(REPO / "tests" / "configs").glob("*.yaml")])


def _minimal() -> dict:
    return {"sources": [{"name": "s", "category": "c", "paths": ["x/*.jsonl"]}], "benchmarks": [], "heldout": {}}


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_schema_defaults_equal_dataclass_defaults(section):
    filled = validate_with_defaults(_minimal())
    assert filled[section] == to_dict(SECTIONS[section]()), section
    # and the filled section builds the dataclass without complaint
    from_dict(SECTIONS[section], filled[section], section)


def test_every_schema_key_is_described_and_closed():
    missing = []

    def walk(node: dict, path: str) -> None:
        if not isinstance(node, dict):
            return
        if node.get("type") == "object" or "properties" in node:
            if "properties" in node and node.get("additionalProperties") is not False:
                missing.append(f"{path}: additionalProperties must be false")
            for key, sub in node.get("properties", {}).items():
                if "description" not in sub:
                    missing.append(f"{path}/{key}: no description")
                walk(sub, f"{path}/{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(load_schema(), "")
    assert missing == []


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path):
    cfg = validate_with_defaults(yaml.safe_load(path.read_text(encoding="utf-8")))
    for section, cls in SECTIONS.items():
        from_dict(cls, cfg[section], section)


def test_config_yaml_is_the_documented_defaults():
    # config/config.yaml is generated from the schema: regenerate with `python -m cptflow.core.schema`.
    from cptflow.core.schema import default_config_text

    text = (REPO / "config" / "config.yaml").read_text(encoding="utf-8")
    assert text == default_config_text()
    for key in load_schema()["properties"]:
        assert f"\n{key}:" in "\n" + text, f"config/config.yaml does not show `{key}`"


def test_typo_is_an_error_naming_the_key():
    cfg = _minimal() | {"clean": {"min_charz": 5}}
    with pytest.raises(ConfigError, match=r"clean.*min_charz"):
        validate_with_defaults(cfg)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) min_charz"):
        from_dict(CleanConfig, {"min_charz": 5}, "clean")


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"dedup/num_perm"):
        validate_with_defaults(_minimal() | {"dedup": {"num_perm": "many"}})


@dataclasses.dataclass(frozen=True)
class Inner:
    a: int = 1


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner | None = None


def test_nested_optional_dataclass_is_built():
    # PEP 604 unions (X | None) of dataclasses must be built, not left as dicts.
    assert from_dict(Outer, {"inner": {"a": 2}}).inner == Inner(2)
