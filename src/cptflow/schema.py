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

from cptflow.config import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


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
            lines.append(f"  config key '{where}': {e.message}")
        raise ConfigError("config does not match config/schema.yaml:\n" + "\n".join(lines))
    return cfg
