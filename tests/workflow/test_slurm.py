"""The SLURM profile against a real SLURM cluster: two virtual nodes on this machine (tests/slurm/cluster.sh).

Jobs really go through sbatch: two ordinary jobs, and one 2-node job whose shell runs
``python -m cptflow.train.launch --nodes 2`` -> ``srun`` -> one ``torchrun`` agent per node -> a gloo all_reduce
(tests/slurm/dist_probe.py, the stand-in for cptflow.train.train). The cluster is started once per session and
stopped at the end (fixture ``slurm_cluster`` in conftest.py, shared with tests/test_slurm_workflow.py).
It is skipped only where the cluster cannot run (not root, no apt-get, a real cluster's slurm.conf
present: cluster.sh exit status 3); with CI or CPTFLOW_REQUIRE_SLURM=1 in the environment that is a
failure instead, so CI cannot pass without running it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, slurm_env

SNAKEFILE = REPO / "tests" / "slurm" / "Snakefile"
PROFILE = REPO / "profiles" / "slurm"
TEST_PROFILE = PROFILE / "test"


def _snakemake(workdir: Path, profile: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--profile", str(profile),
           *extra]
    return subprocess.run(cmd, cwd=REPO, env=slurm_env(), capture_output=True, text=True, timeout=timeout)


def _scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as key=value pairs (finished jobs stay visible for MinJobAge=300 s)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


@pytest.mark.slurm
def test_profile_runs_jobs_through_sbatch_and_one_job_spans_two_nodes(slurm_cluster: None, tmp_path: Path) -> None:
    proc = _snakemake(tmp_path, TEST_PROFILE)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log

    # Every job was submitted with sbatch: Snakemake logs one SLURM job id per job ...
    submitted = dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", log))
    assert len(submitted) == 3, log
    # ... and SLURM wrote each job's output where the plugin said, under .snakemake/slurm_logs/rule_<name>/
    for job_id, slurm_log in submitted.items():
        assert Path(slurm_log).is_file() and Path(slurm_log).name == f"{job_id}.log", slurm_log
        assert Path(slurm_log).is_relative_to(tmp_path / ".snakemake" / "slurm_logs")
    by_rule = {Path(p).relative_to(tmp_path / ".snakemake" / "slurm_logs").parts[0]: j for j, p in submitted.items()}
    assert set(by_rule) == {"rule_hello", "rule_train"}

    # The ordinary jobs ran inside their SLURM job, on a test-cluster node.
    for name in ("a", "b"):
        fields = dict(kv.split("=", 1) for kv in (tmp_path / "hello" / f"{name}.txt").read_text().split())
        assert fields["job"] in submitted and fields["node"] in {"n1", "n2"}, fields

    # The training-style job: SLURM allocated 2 nodes, 1 task and 1 (fake) GPU per node, 2 CPUs per task,
    # all from profiles/slurm/test's set-resources/set-threads for rule `train`.
    train_id = by_rule["rule_train"]
    job = _scontrol_job(train_id)
    assert job["JobState"] == "COMPLETED", job
    assert job["NumNodes"] == "2" and job["NumTasks"] == "2" and job["CPUs/Task"] == "2", job
    assert job["TresPerNode"] == "gres:gpu:1", job

    # ... and its torchrun workers formed one gloo group across both nodes.
    probe = json.loads((tmp_path / "train" / "probe.json").read_text())
    assert probe["world_size"] == 2 and probe["rank_sum"] == 1.0, probe
    workers = probe["workers"]
    assert sorted(w["SLURM_NODEID"] for w in workers) == ["0", "1"], workers
    assert sorted(w["SLURMD_NODENAME"] for w in workers) == ["n1", "n2"], workers
    assert {w["SLURM_JOB_ID"] for w in workers} == {train_id}, workers
    assert {w["MASTER_PORT"] for w in workers} == {str(20000 + int(train_id) % 20000)}, workers
    # node rank 0 is the first node of the step, i.e. the master's node
    assert {w["GROUP_RANK"] for w in workers if w["SLURM_NODEID"] == "0"} == {"0"}, workers
    # the step got the job's GPU and CPUs on every node (srun inside the batch script inherits them)
    assert all(w["SLURM_GPUS_ON_NODE"] == "1" and w["CUDA_VISIBLE_DEVICES"] == "0" for w in workers), workers
    assert all(w["SLURM_CPUS_PER_TASK"] == "2" for w in workers), workers


def test_real_profile_is_valid_and_shapes_training_as_documented(tmp_path: Path) -> None:
    """profiles/slurm parses (every key known to Snakemake 9 and the plugin) and gives `train` its shape.

    A dry run: no cluster needed, nothing submitted.
    """
    proc = _snakemake(tmp_path, PROFILE, "--dry-run", timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    train = re.search(r"rule train:.*?resources: ([^\n]+)", log, re.S)
    assert train, log
    res = dict(kv.split("=", 1) for kv in train.group(1).split(", "))
    assert res["nodes"] == "2" and res["tasks"] == "2" and res["mpi"] == "srun", res
    assert res["slurm_extra"] == "--gpus-per-node=8" and res["procs_per_node"] == "gpu", res
    assert res["slurm_partition"] == "EDIT_ME_gpu_partition" and res["slurm_account"] == "EDIT_ME_account", res


def test_test_profile_mirrors_the_real_one() -> None:
    """The test profile differs from profiles/slurm only in the cluster's values and status polling."""
    real = yaml.safe_load((PROFILE / "config.yaml").read_text())
    test = yaml.safe_load((TEST_PROFILE / "config.yaml").read_text())
    polling = {"slurm-status-command", "slurm-init-seconds-before-status-checks", "seconds-between-status-checks"}
    assert set(test) - set(real) == polling
    assert set(real) - set(test) == set()
    assert set(real["default-resources"]) - set(test["default-resources"]) == {"slurm_account"}
    assert set(test["default-resources"]) - set(real["default-resources"]) == set()
    assert set(real["set-resources"]) == set(test["set-resources"]) == {"train", "evaluate"}
    for rule in ("train", "evaluate"):
        assert set(real["set-resources"][rule]) == set(test["set-resources"][rule]), rule
    assert set(real["set-threads"]) == set(test["set-threads"]) == {"train"}
    assert real["executor"] == test["executor"] == "slurm"
    assert test["slurm-no-account"] is True and test["slurm-status-command"] == "squeue"
