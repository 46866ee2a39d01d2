"""The DeepSpeed overlay venv the DeepSpeed tests run in (tests/train/test_deepspeed.py, tests/sft/test_finetune.py).

deepspeed is kept out of the project venv on purpose (transformers imports it whenever it is
installed, ~2 s per import in every stage). The ``overlay`` fixture builds an *overlay* venv once, in
``$CPTFLOW_TEST_CACHE`` (default ``~/.cache/cptflow-tests``)/venv-deepspeed: its site-packages holds
only deepspeed and those of its dependencies the project venv lacks, all pinned by constraints.txt
and installed with ``--no-deps`` (pip never resolves torch), and a ``.pth`` file adds the project
venv's site-packages behind it, so torch, transformers and cptflow are the very same files. A stamp
(constraints hash, base site-packages, Python) makes later sessions reuse it; the CPU communication op
DeepSpeed JIT-compiles on first use (~30 s) is built during set-up into the same cache
(TORCH_EXTENSIONS_DIR). When the install cannot reach a package index the tests skip locally and
*fail* under CI (or CPTFLOW_REQUIRE_DEEPSPEED=1), so CI cannot pass without running them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"
RECIPE = 1  # bump when the overlay recipe below changes: old overlays are rebuilt
# pip's words for "no index reachable / package not there": locally a reason to skip, not a bug.
OFFLINE = ("No matching distribution found", "no matching distributions available", "Could not find a version",
           "NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
           "Network is unreachable", "Max retries exceeded", "ConnectTimeout", "ReadTimeout", "ProxyError",
           "Name or service not known")

# Prints, from inside the overlay, deepspeed's dependency closure that no site-packages satisfies.
MISSING_SCRIPT = r"""
import importlib.metadata as md, json
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
seen, todo, missing, wrong = set(), ["deepspeed"], [], []
while todo:
    req = todo.pop()
    req = req if isinstance(req, Requirement) else Requirement(req)
    key = canonicalize_name(req.name)
    if key in seen:
        continue
    seen.add(key)
    try:
        dist = md.distribution(req.name)
    except md.PackageNotFoundError:
        missing.append(req.name)
        continue
    if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
        wrong.append(f"{req.name} {dist.version} does not satisfy {req}")
    for r in dist.requires or []:
        r = Requirement(r)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            todo.append(r)
print(json.dumps({"missing": sorted(missing), "wrong": wrong}))
"""




class InstallError(Exception):
    def __init__(self, msg: str, offline: bool = False):
        super().__init__(msg)
        self.offline = offline


@dataclass(frozen=True)
class Overlay:
    python: Path  # the overlay venv's interpreter
    env: dict[str, str]  # environment for its processes (PATH with its bin/ for ninja, DS_ACCELERATOR, ...)
    deepspeed_version: str


def _must_run() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("CPTFLOW_REQUIRE_DEEPSPEED") == "1"


def _pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _base_site_dirs() -> list[str]:
    """The project venv's site-packages (this interpreter's), purelib and platlib."""
    return list(dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]))


def _overlay_env(venv: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", DS_ACCELERATOR="cpu",
               TORCH_EXTENSIONS_DIR=str(cache / "torch_extensions"), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO / "src"))
    return env


def _run(cmd: list[str], env: dict[str, str], what: str, timeout: int = 900) -> str:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise InstallError(f"{what}: timed out after {timeout} s:\n{e.stdout}\n{e.stderr}") from e
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise InstallError(f"{what} failed (exit {proc.returncode}):\n{out[-2000:]}",
                           offline=any(s in out for s in OFFLINE))
    return out


def _build(venv: Path, cache: Path, pins: dict[str, str]) -> None:
    """Create the overlay venv, install deepspeed and its missing dependencies, build its CPU comm op."""
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], dict(os.environ), "python -m venv")
    py = str(venv / "bin" / "python")
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], dict(os.environ),
                "overlay sysconfig").strip()
    # addsitedir (not a bare path line) also runs the base's own .pth files (editable installs).
    lines = [f"import site; site.addsitedir({d!r})" for d in _base_site_dirs()]
    Path(site, "_cptflow_base_venv.pth").write_text("\n".join(lines) + "\n")
    env = _overlay_env(venv, cache)
    if subprocess.run([py, "-c", "import pip"], env=env, capture_output=True).returncode != 0:
        _run([py, "-m", "ensurepip"], env, "ensurepip")  # only when the project venv has no pip
    pip = [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-c", str(CONSTRAINTS)]
    # --no-build-isolation: deepspeed's setup.py imports torch; an isolated build would fetch one.
    _run(pip + [f"deepspeed=={pins['deepspeed']}"], env, "pip install deepspeed")
    for _ in range(5):  # a missing dependency may itself need others
        state = json.loads(_run([py, "-c", MISSING_SCRIPT], env, "dependency check").strip().splitlines()[-1])
        if state["wrong"]:
            raise InstallError("deepspeed's requirements conflict with the project venv: " + "; ".join(state["wrong"]))
        if not state["missing"]:
            break
        unpinned = [n for n in state["missing"] if n.lower().replace("_", "-") not in pins]
        if unpinned:
            raise InstallError(f"deepspeed needs {unpinned}, not pinned in {CONSTRAINTS}: pin them there")
        _run(pip + [f"{n}=={pins[n.lower().replace('_', '-')]}" for n in state["missing"]], env,
             f"pip install {' '.join(state['missing'])}")
    else:
        raise InstallError(f"deepspeed's dependencies still missing after 5 rounds: {state['missing']}")
    # Build the CPU shared-memory comm op now (cached), so a compiler problem shows here, not as a hung run.
    build_op = ("from deepspeed.accelerator import get_accelerator; "
                "get_accelerator().create_op_builder('ShareMemCommBuilder').load()")
    _run([py, "-c", build_op], env, "JIT-compiling deepspeed_shm_comm")


@pytest.fixture(scope="session")
def overlay() -> Overlay:
    """The overlay interpreter with deepspeed; built once per constraints.txt, then reused."""
    cache = Path(os.environ.get("CPTFLOW_TEST_CACHE") or Path.home() / ".cache" / "cptflow-tests")
    cache.mkdir(parents=True, exist_ok=True)
    venv = cache / "venv-deepspeed"
    pins = _pins()
    stamp_text = json.dumps({"recipe": RECIPE, "constraints": hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest(),
                             "base": _base_site_dirs(), "python": sys.version}, sort_keys=True)
    stamp = venv / "cptflow-stamp.json"
    t0 = time.perf_counter()
    with open(cache / "venv-deepspeed.lock", "w") as lock:  # concurrent sessions build it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.is_file() and stamp.read_text() == stamp_text):
            try:
                _build(venv, cache, pins)
            except InstallError as e:
                shutil.rmtree(venv, ignore_errors=True)
                reason = f"cannot build the deepspeed overlay venv in {venv}: {e}"
                if _must_run() or not e.offline:
                    pytest.fail(reason + ("\n(CI / CPTFLOW_REQUIRE_DEEPSPEED=1: these tests must run)"
                                          if _must_run() else ""))
                pytest.skip(reason)
            stamp.write_text(stamp_text)
            print(f"deepspeed overlay built in {time.perf_counter() - t0:.0f} s: {venv}")
        else:
            print(f"deepspeed overlay reused: {venv}")
    env = _overlay_env(venv, cache)
    py = venv / "bin" / "python"
    version = subprocess.run([str(py), "-c", "import deepspeed; print(deepspeed.__version__)"], env=env,
                             capture_output=True, text=True)
    assert version.returncode == 0, version.stderr
    return Overlay(py, env, version.stdout.strip().splitlines()[-1])
