"""Validate a run config against ``config/schema.yaml`` and fill in the schema's defaults.

We do this ourselves rather than through Snakemake's ``validate`` so that the same code fills the
same defaults everywhere: in the workflow, in tests, and inside remote SLURM jobs (some Snakemake 9
releases skipped ``validate`` there and lost the defaults: snakemake issues #3614, #3921).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cptflow.core.config import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "config" / "schema.yaml"


def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or SCHEMA_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _fill_defaults(validator_cls: type) -> type:
    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator: Any, properties: dict, instance: Any, schema: dict) -> Any:
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


def validate_with_defaults(cfg: dict[str, Any], schema: dict[str, Any] | str | Path | None = None) -> dict[str, Any]:
    """Return a validated copy of ``cfg`` with defaults filled; errors name the offending key path."""
    if not isinstance(schema, dict):
        schema = load_schema(schema)
    cfg = copy.deepcopy(cfg)
    cls = _fill_defaults(jsonschema.validators.validator_for(schema))
    errors = sorted(cls(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:10]:
            where = "/".join(str(p) for p in e.absolute_path) or "<top level>"
            if e.validator == "required":
                # Required keys have no default on purpose (sources, benchmarks, heldout): say what to write.
                name = e.message.split("'")[1] if e.message.count("'") >= 2 else "?"
                if where != "<top level>":
                    name = f"{where}/{name}"
                sub = e.schema.get("properties", {}).get(name.rsplit("/", 1)[-1], {})
                desc = " ".join((sub.get("description") or "").split())
                lines.append(f"  config key '{name}' is required (it has no default): {desc}")
                continue
            lines.append(f"  config key '{where}': {e.message}")
        raise ConfigError("config does not match config/schema.yaml:\n" + "\n".join(lines))
    return cfg


def load_config(path: str | Path, schema: str | Path | None = None) -> dict[str, Any]:
    """Load a run YAML and validate it against the schema, filling defaults (outside Snakemake)."""
    with open(path, encoding="utf-8") as f:
        cfg = yaml.safe_load(f) or {}
    return validate_with_defaults(cfg, schema)


# ---- config/config.yaml: the defaults, with every key's description as a comment ---------------

def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    import textwrap

    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), width - len(indent) - 2)]


def _scalar(value: Any) -> str:
    out = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return out[:-4].rstrip() if out.endswith("\n...") else out.removesuffix("...").strip()


def _render(schema: dict[str, Any], values: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for key, sub in schema.get("properties", {}).items():
        if key not in values:
            continue
        value = values[key]
        if sub.get("description"):
            lines += _wrap(sub["description"], indent)
        if isinstance(value, dict) and "properties" in sub:
            lines.append(f"{indent}{key}:" + (" {}" if not value else ""))
            lines += _render(sub, value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            item = sub.get("items", {})
            for field_name, field_schema in item.get("properties", {}).items():
                if field_schema.get("description"):
                    lines += _wrap(f"  {field_name}: {field_schema['description']}", indent)
            block = yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True, width=100,
                                   default_flow_style=None)
            lines += [indent + line for line in block.rstrip("\n").split("\n")]
        else:
            lines.append(f"{indent}{key}: {_scalar(value)}")
        if not indent:
            lines.append("")
    return lines


def documented_config(values: dict[str, Any], schema: dict[str, Any] | None = None, header: str = "") -> str:
    """YAML of ``values`` in schema order, each key preceded by its description as a comment."""
    schema = schema or load_schema()
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] + [""] if header else []
    return "\n".join(lines + _render(schema, values, "")).rstrip("\n") + "\n"


CONFIG_HEADER = """cptflow run config: every key with its default value and what it does.
Generated from config/schema.yaml by `python -m cptflow.core.schema` (tests/test_config.py keeps them equal).
Copy this file for your own run and edit it; unknown keys are errors, missing keys take these defaults,
except sources, benchmarks and heldout, which every run config must name itself (benchmarks: [] and
heldout: {} mean none). This file is read only when named (--configfile config/config.yaml): the ones
below are the small real data the repository ships."""

DEFAULT_INPUTS = {
    "run": "default",
    "sources": [
        {"name": "zh_web", "category": "zh_web", "paths": ["workflow/resources/demo/corpus/zh_web/*.jsonl"], "lang": "zh"},
        {"name": "zh_books", "category": "zh_books", "paths": ["workflow/resources/demo/corpus/zh_books/*.jsonl"], "lang": "zh"},
        {"name": "en_replay", "category": "en_replay", "paths": ["workflow/resources/demo/corpus/en_replay/*.jsonl"], "lang": "en"},
    ],
    "benchmarks": [
        {"name": "ceval", "path": "workflow/resources/demo/benchmarks/ceval", "layout": "ceval", "lang": "zh", "eval_split": "val"},
        {"name": "cmmlu", "path": "workflow/resources/demo/benchmarks/cmmlu", "layout": "cmmlu", "lang": "zh", "eval_split": "test"},
        {"name": "mmlu", "path": "workflow/resources/demo/benchmarks/mmlu", "layout": "mmlu", "lang": "en", "eval_split": "test"},
    ],
    "heldout": {"zh": "workflow/resources/demo/heldout/zh_modern.jsonl", "en": "workflow/resources/demo/heldout/en.jsonl"},
}


def default_config_text() -> str:
    values = validate_with_defaults(copy.deepcopy(DEFAULT_INPUTS))
    ordered = {k: values[k] for k in load_schema()["properties"] if k in values}
    return documented_config(ordered, header=CONFIG_HEADER)


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_PATH.parent / "config.yaml"
    target.write_text(default_config_text(), encoding="utf-8")
    print(f"wrote {target}")
