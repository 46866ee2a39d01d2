"""cptflow.train.launch: the torchrun command lines of a training rule, and a real local run through profiles/local.

The multi-node command is run for real against a SLURM cluster in tests/test_slurm.py; here its shell
script is also executed by bash with a stand-in `scontrol` (the one SLURM command it calls) and a stand-in
interpreter that records its argv, to pin down quoting and the master address/port logic everywhere.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cptflow.train.launch import LaunchConfig, build_command, local_command, main, node_script, slurm_command, split_argv

REPO = Path(__file__).resolve().parents[2]
# worker flags with everything a shell could mangle: spaces, quotes, JSON, $, globs, an empty string
NASTY = ["--params", '{"lr": 3e-4, "name": "a b", "q": "it\'s"}', "--out", "dir with space/x.json", "$HOME", "*", ""]


def test_local_command_is_standalone_torchrun() -> None:
    cfg = LaunchConfig(nodes=1, procs_per_node=2, python="/venv/bin/python")
    assert build_command(cfg, ["--params", "{}"]) == (
        "/venv/bin/python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 "
        "-m cptflow.train.train --params '{}'"
    )
    assert local_command(LaunchConfig(procs_per_node="gpu", module="m"), []).endswith("--nproc-per-node=gpu -m m")


def test_local_command_keeps_worker_args_intact() -> None:
    cmd = local_command(LaunchConfig(python="python"), NASTY)
    assert shlex.split(cmd) == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                                "--nproc-per-node=1", "-m", "cptflow.train.train", *NASTY]


def test_slurm_command_is_one_srun_task_per_node() -> None:
    cfg = LaunchConfig(nodes=4, procs_per_node=8, cpus_per_task=32, python="python")
    words = shlex.split(build_command(cfg, ["--x"]))
    assert words[:7] == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=32",
                         "--kill-on-bad-exit=1", "bash"]
    assert words[7:] == ["-c", node_script(cfg, ["--x"])]
    # without cpus_per_task srun keeps its own default
    assert "--cpus-per-task" not in slurm_command(LaunchConfig(nodes=2), [])


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.parametrize("node_id", ["0", "1"])
def test_node_script_finds_master_and_passes_args_verbatim(tmp_path: Path, node_id: str) -> None:
    """Run the per-node script as srun would: SLURM variables set, scontrol answering, torchrun recorded."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # scontrol as SLURM answers for a 2-node step n[7-8] whose nodes have addresses 10.0.0.7/8
    _stub(bindir / "scontrol", (
        'if [ "$1 $2" = "show hostnames" ]; then [ "$3" = "n[7-8]" ] && printf "n7\\nn8\\n"; exit; fi\n'
        'if [ "$1 $2 $3" = "show node -o" ]; then\n'
        '  echo "NodeName=$4 Arch=x86_64 NodeAddr=10.0.0.${4#n} NodeHostName=host-$4 Version=22.05"; exit; fi\n'
        "exit 1\n"
    ))
    record = tmp_path / "argv.json"
    (tmp_path / "record.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[2:], 'addr': os.environ['MASTER_ADDR'], 'port': os.environ['MASTER_PORT']},\n"
        "          open(sys.argv[1], 'w'))\n"
    )
    _stub(bindir / "fakepython",
          f'exec {shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / "record.py"))} {shlex.quote(str(record))} "$@"\n')
    cfg = LaunchConfig(nodes=2, procs_per_node=3, python=str(bindir / "fakepython"))
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "SLURM_STEP_NODELIST": "n[7-8]",
           "SLURM_NODEID": node_id, "SLURM_JOB_ID": "123457"}
    words = shlex.split(slurm_command(cfg, NASTY))
    assert words[-3:-1] == ["bash", "-c"]
    subprocess.run(["bash", "-c", words[-1]], env=env, check=True, cwd=tmp_path)
    got = json.loads(record.read_text())
    assert got["addr"] == "10.0.0.7"  # NodeAddr of the step's first node, not its (unresolvable) name
    assert got["port"] == str(20000 + 123457 % 20000)
    assert got["argv"] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=3",
                           f"--node-rank={node_id}", "--master-addr=10.0.0.7", f"--master-port={got['port']}",
                           "-m", "cptflow.train.train", *NASTY]


def test_config_rejects_nonsense() -> None:
    for bad in ({"nodes": 0}, {"procs_per_node": 0}, {"procs_per_node": "cpu"}, {"cpus_per_task": 0},
                {"module": "a b"}, {"port_base": 80}, {"port_base": 60000}):
        with pytest.raises(ValueError):
            LaunchConfig(**bad)


def test_split_argv_at_first_double_dash() -> None:
    assert split_argv(["--nodes", "2", "--", "--a", "--", "b"]) == (["--nodes", "2"], ["--a", "--", "b"])
    assert split_argv(["--nodes", "2"]) == (["--nodes", "2"], [])


def test_cli_dry_run_prints_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--nodes", "2", "--procs-per-node", "gpu", "--python", "py", "--dry-run", "--", "--x", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == build_command(LaunchConfig(nodes=2, procs_per_node="gpu", python="py"), ["--x", "1"])


def test_cli_refuses_multi_node_outside_slurm(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert main(["--nodes", "2", "--", "--x"]) == 2
    assert "needs a SLURM allocation" in capsys.readouterr().err
    assert main(["--procs-per-node", "0"]) == 2


def test_local_profile_runs_the_training_rule_with_torchrun(tmp_path: Path) -> None:
    """The training-style rule of tests/slurm/Snakefile under profiles/local: torchrun --standalone, 2 workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "tests" / "slurm" / "Snakefile"), "-d", str(tmp_path),
         "--profile", str(REPO / "profiles" / "local")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = json.loads((tmp_path / "train" / "probe.json").read_text())
    assert probe["world_size"] == 2 and probe["rank_sum"] == 1.0, probe
    assert sorted(w["LOCAL_RANK"] for w in probe["workers"]) == ["0", "1"]
    assert all(w["SLURM_JOB_ID"] is None for w in probe["workers"])
    assert (tmp_path / "hello" / "a.txt").read_text().startswith("job=none node=none")
    log = (tmp_path / "logs" / "train" / "probe.log").read_text()
    assert "torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 -m dist_probe" in log
