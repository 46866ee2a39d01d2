"""train/<stage> with engine fsdp (FSDP2, ``fully_shard``): real 2-process torchrun runs over gloo on CPU.

What gloo gives FSDP2 in torch 2.13: everything these runs need — all-gather, reduce-scatter, the
bf16/fp32 MixedPrecisionPolicy, DCP save/load with resharding — so nothing is skipped on CPU. Runs
use test_train's tiny LLaMA and data (12 AdamW steps of global batch 2 = micro 1 x 2 processes).

* FSDP2 ends within ATOL of one-process DDP (which test_train shows is bit-identical to 2-process
  DDP). Not bit for bit: the global grad norm is a reduction over shards, summed in another order,
  and clipping scales every gradient by it. Measured: max |w diff| 1.5e-8.
* A 2-process FSDP2 run SIGKILLed after a checkpoint resumes in ONE process from the sharded DCP
  checkpoint (a different world size), continues at the same sample, and ends within ATOL.
* A skipped spike leaves the DCP state (fp32 sharded weights, exp_avg, exp_avg_sq, step)
  bit-identical; bf16 mixed precision keeps the master weights fp32; activation checkpointing runs
  under FSDP2.
"""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cptflow.core.config import from_dict
from cptflow.train import checkpoint, train
from cptflow.train.config import TrainStageConfig
from support.training import BASE, kill_after_checkpoint, paths, run_inproc, samples, torchrun, weights

FSDP = {**BASE, "engine": "fsdp"}
ATOL = 1e-6  # max |weight diff| vs DDP after 12 steps (module docstring)


@pytest.fixture(scope="module")
def ddp(tiny):
    return run_inproc(tiny, "ddp")


@pytest.fixture(scope="module")
def fsdp(tiny):
    p = paths(tiny["root"], tiny["model"], tiny["data"], "fsdp")
    proc = torchrun(2, p, FSDP, "--debug-samples", str(tiny["root"] / "fsdp_samples"))
    proc.wait(timeout=300)
    log = (p.output_dir.parent / "torchrun.log").read_text()
    assert proc.returncode == 0, log
    return p, log


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp_two_processes_match_ddp(ddp, fsdp):
    p, log = fsdp
    assert "FSDP2 | world size 2" in log and "backend gloo" in log
    final = checkpoint.latest(next(p.checkpoint_dir.glob("run-*")))
    assert sorted(f.name for f in (final / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    a, b, init = weights(ddp), weights(p), load_file(str(ddp.model / "model.safetensors"))
    diff = max_diff(a, b)
    print(f"FSDP2 vs DDP: max |w diff| = {diff:.3g}")
    assert diff < ATOL and max_diff(a, init) > 1000 * ATOL  # agrees, and it trained
    assert all(b[k].dtype == torch.float32 and b[k].shape == init[k].shape for k in init)
    la = [json.loads(x)["loss"] for x in ddp.metrics.read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in p.metrics.read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-6)
    assert json.loads(p.stats.read_text())["summary"]["engine"] == "fsdp"


def test_fsdp_killed_run_resumes_on_another_world_size(tiny, fsdp):
    ref, _ = fsdp
    p = paths(tiny["root"], tiny["model"], tiny["data"], "fsdp_killed")
    dbg = tiny["root"] / "fsdp_killed_samples"
    proc = torchrun(2, p, FSDP, "--debug-samples", str(dbg), "--debug-step-delay-s", "0.5")
    kill_after_checkpoint(proc, p, 4)
    assert not p.output_dir.exists()
    last = checkpoint.complete_checkpoints(next(p.checkpoint_dir.glob("run-*")))[-1][0]
    assert last in (4, 8)
    run_inproc(tiny, "fsdp_killed", {"engine": "fsdp"}, hooks=train.DebugHooks(samples_dir=dbg))  # 1 process
    one = [json.loads(x) for x in (dbg / "rank0.jsonl").read_text().splitlines() if len(json.loads(x)["ids"]) == 2]
    assert one[0]["step"] == last + 1 and [r["step"] for r in one] == list(range(last + 1, 13))
    ref_ids = samples(tiny["root"] / "fsdp_samples")
    assert all(r["ids"] == [ref_ids[r["step"]][0][0], ref_ids[r["step"]][1][0]] for r in one)  # same samples
    diff = max_diff(weights(ref), weights(p))
    print(f"FSDP2 2 processes -> killed -> 1 process vs uninterrupted: max |w diff| = {diff:.3g}")
    assert diff < ATOL
    assert json.loads(p.stats.read_text())["summary"]["resumed_from_step"] == last


def dcp_state(step_dir, tmp):
    dcp_to_torch_save(step_dir / "dcp", tmp)
    return torch.load(tmp, weights_only=False)


def test_fsdp_skipped_spike_leaves_state_bit_identical_in_bf16(tiny, tmp_path):
    """One process (FSDP2 with a group of one), bf16 mixed precision and activation checkpointing."""
    p = run_inproc(tiny, "fsdp_spike", {"engine": "fsdp", "precision": "bf16", "gradient_checkpointing": True,
                                        "loss_spike_factor": 3.0,
                                        "loss_spike_window": 3, "checkpoint_every": 1, "keep_last": 0, "max_steps": 7},
                   hooks=train.DebugHooks(spike_steps=(6,)))
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False] * 5 + [True, False]
    rdir = next(p.checkpoint_dir.glob("run-*"))
    s5, s6, s7 = (dcp_state(rdir / f"step_{s:08d}", tmp_path / f"{s}.pt") for s in (5, 6, 7))
    assert s5["model"].keys() == s6["model"].keys() and all(v.dtype == torch.float32 for v in s5["model"].values())
    assert all(torch.equal(s5["model"][k], s6["model"][k]) for k in s5["model"])
    assert not all(torch.equal(s6["model"][k], s7["model"][k]) for k in s6["model"])
    st5, st6 = s5["optimizer"]["state"], s6["optimizer"]["state"]
    assert st5.keys() == st6.keys() and len(st5) > 0
    for name, st in st5.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(st[key], st6[name][key]), (name, key)
    assert all(int(s7["optimizer"]["state"][n]["step"]) == 6 for n in st6)


def test_fsdp_embeddings_only_on_a_tied_model(tiny):
    p = run_inproc(tiny, "fsdp_embed", {"engine": "fsdp", "trainable": "embeddings_only", "max_steps": 3},
                   model=tiny["tied"])
    before, after = load_file(str(tiny["tied"] / "model.safetensors")), weights(p)
    assert before.keys() == after.keys() and "lm_head.weight" not in after
    for k in before:
        assert torch.equal(before[k], after[k]) == (k != "model.embed_tokens.weight"), k


def test_engine_and_deepspeed_must_agree():
    with pytest.raises(Exception, match="engine fsdp with a deepspeed json"):
        from_dict(TrainStageConfig, {"engine": "fsdp", "deepspeed": "config/deepspeed/zero2.json"})
    with pytest.raises(Exception, match="engine deepspeed needs"):
        from_dict(TrainStageConfig, {"engine": "deepspeed"})
