"""The conda env file and pyproject must stay in step with the pinned constraints."""

import re
import tomllib

import yaml


def _pins(repo):
    return {
        k.lower(): v
        for k, v in (line.strip().split("==") for line in (repo / "constraints.txt").read_text().splitlines() if "==" in line)
    }


def test_conda_env_pins_match_constraints(repo):
    pins = _pins(repo)
    env = yaml.safe_load((repo / "envs" / "cptflow.yaml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    checked = 0
    for item in pip_block:
        if "==" in item:
            name, version = item.split("==")
            assert pins[name.lower()] == version, f"envs/cptflow.yaml pins {name}=={version}, constraints.txt {pins[name.lower()]}"
            checked += 1
    assert checked >= 10


def test_every_dependency_is_pinned_and_torch_is_the_cpu_pin(repo):
    pins = _pins(repo)
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    for dep in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.split(r"[<>=!\[ ]", dep)[0].lower()
        assert name in pins, f"{name} is not pinned in constraints.txt"
    assert pins["torch"] == "2.13.0"
