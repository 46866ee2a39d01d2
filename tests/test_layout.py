"""The package shows the DAG: a subpackage per rule family, core below everything, no import cycles, small modules.

These are the layout rules of docs/DESIGN.md, checked on the source rather than trusted to review.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "cptflow"
FAMILIES = ("data", "tokenizer", "model", "pack", "train", "release", "eval", "report", "sft")
MAX_LINES = 300


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """cptflow modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cptflow"):
            for a in node.names:
                name = f"{node.module}.{a.name}"
                found.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("cptflow"))
    return {m for m in found if m in known}


def test_no_import_cycles():
    known = modules()
    graph = {m: imports(p, known) - {m, "cptflow"} for m, p in known.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d] if d in path
                                                                     else path + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_core_depends_on_nothing_above_it():
    known = modules()
    for m, p in known.items():
        if m.startswith("cptflow.core"):
            above = {d for d in imports(p, known) if not d.startswith("cptflow.core") and d != "cptflow"}
            assert not above, f"{m} imports {sorted(above)}"


def test_every_family_has_its_rule_file_and_test_folder():
    rules = {p.stem for p in (REPO / "workflow" / "rules").glob("*.smk")} - {"common"}
    assert rules == set(FAMILIES)
    for fam in FAMILIES:
        assert (SRC / fam / "__init__.py").is_file(), fam
        assert (REPO / "tests" / fam).is_dir(), fam


def test_every_rule_runs_a_module_of_its_family():
    for fam in FAMILIES:
        text = (REPO / "workflow" / "rules" / f"{fam}.smk").read_text(encoding="utf-8")
        # The training launcher starts the module named by its --module flag (cptflow.train.train by default).
        text = re.sub(r"python -m cptflow\.train\.launch --module (cptflow[\w.]+)", r"python -m \1", text)
        for module in re.findall(r"python -m (cptflow[\w.]+)", text):
            assert module.split(".")[1] == fam, f"{fam}.smk runs {module}"
            assert (SRC.parent / Path(*module.split("."))).with_suffix(".py").is_file(), module


def test_no_module_over_300_lines():
    long = {str(p.relative_to(REPO)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these along a natural seam: {long}"
