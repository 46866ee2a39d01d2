"""Checkpoint directory protocol: complete-or-absent, exact restore, RNG round trip, pruning, fingerprints."""

import os
import random

import numpy as np
import pytest
import torch

from cptflow.train import checkpoint, engines, parallel
from cptflow.train.config import TrainStageConfig
from cptflow.train.loss import CausalLMLoss

INFO = parallel.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def tiny(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg)


def engine(tied: bool = False):
    return engines.DDPEngine(CausalLMLoss(tiny(tied), "sdpa", 8), TrainStageConfig(precision="fp32", lr=1e-2), INFO)


def trained_engine(tied: bool = False):
    eng = engine(tied)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):  # two updates so AdamW has moments and a step count
        eng.backward(eng.model(input_ids=x, position_ids=torch.arange(8).expand(2, 8), labels=x))
        eng.step(1e-2, apply=True)
    return eng


@pytest.mark.parametrize("tied", [False, True])
def test_save_then_load_restores_weights_and_optimizer_exactly(tmp_path, tied):
    eng = trained_engine(tied)
    rows = [{"step": 1, "loss": 4.1}, {"step": 2, "loss": 4.0}]
    path = checkpoint.save(tmp_path, 2, eng, {"step": 2, "samples_seen": 8}, rows, INFO, keep_last=2)
    assert path.name == "step_00000002" and (path / checkpoint.MARKER).is_file()
    assert not list(tmp_path.glob(".*.tmp"))
    fresh = engine(tied)
    state, got_rows = checkpoint.load(path, fresh, INFO)
    assert state == {"step": 2, "samples_seen": 8} and got_rows == rows
    for (n, a), (_, b) in zip(eng.module.state_dict().items(), fresh.module.state_dict().items()):
        assert torch.equal(a, b), n
    if tied:
        assert fresh.module.lm_head.weight is fresh.module.model.embed_tokens.weight
    sa, sb = eng.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][name], sb[k][name])


def test_rng_states_round_trip_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpoint.capture_rng(), tmp_path / "rng.pt")
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_only_complete_checkpoints_count_and_stale_temps_go(tmp_path):
    for step in (3, 6):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / checkpoint.MARKER).write_text("ok")
    (tmp_path / "step_00000009").mkdir()  # no marker: a half-copied or foreign dir, never loaded
    (tmp_path / ".step_00000012.tmp").mkdir()  # a save killed before its rename
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [3, 6]
    assert checkpoint.latest(tmp_path).name == "step_00000006"
    assert [p.name for p in checkpoint.remove_stale(tmp_path)] == [".step_00000012.tmp"]
    assert checkpoint.latest(tmp_path / "missing") is None


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / checkpoint.MARKER).write_text("ok")
    assert checkpoint.prune(tmp_path, 0) == []
    gone = checkpoint.prune(tmp_path, 2)
    assert [p.name for p in gone] == ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_fingerprint_follows_params_and_inputs(tmp_path):
    f = tmp_path / "model"
    f.mkdir()
    (f / "w.bin").write_bytes(b"x")
    a = checkpoint.fingerprint({"lr": 1e-3}, [f])
    assert checkpoint.fingerprint({"lr": 1e-3}, [f]) == a
    assert checkpoint.fingerprint({"lr": 2e-3}, [f]) != a
    st = (f / "w.bin").stat()
    os.utime(f / "w.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the input was re-made
    assert checkpoint.fingerprint({"lr": 1e-3}, [f]) != a
    assert checkpoint.run_dir(tmp_path, a).name == f"run-{a[:12]}"
