"""Stage code versions, read from the source without importing it.

Snakemake reruns a job when its rule's params change, but it does not see edits under ``src/``. Each
stage module therefore has a ``VERSION`` constant, bumped when the stage's output would change, and
every rule passes it as a param (``version=stage_version(...)``): bumping it reruns that stage and what
follows. It is read with ``ast`` so that planning a DAG does not import torch for the training stages.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def stage_version(module: str, src_root: str | Path) -> int:
    """``VERSION`` of ``module`` (dotted, e.g. ``cptflow.data.clean``) under ``src_root``; errors name the file."""
    path = Path(src_root).joinpath(*module.split(".")).with_suffix(".py")
    if not path.is_file():
        raise ValueError(f"stage module {module}: no file {path}")
    for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "VERSION" for t in node.targets):
            value = ast.literal_eval(node.value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ValueError(f"{path}: VERSION must be an int, got {value!r}")
    raise ValueError(f"{path}: stage module without a VERSION constant")
