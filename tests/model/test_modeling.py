"""cptflow.model.modeling, the parts init and training share: what decays, and new-rows-only training.

The bit-identity claim is checked after real training: the train stage itself (cptflow.train.train, in
process: AdamW from ``param_groups``, gradient clipping, the lr schedule) on a tiny LLaMA whose config
says that ids 0..191 are the base vocabulary and 192..255 are new; the packed data uses all 256 ids,
so new rows get gradients as inputs and as outputs, and base rows would too but for the hook.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cptflow.core.config import from_dict
from cptflow.model import modeling
from cptflow.train import train
from cptflow.train.config import TrainStageConfig
from support.training import make_data, make_model, paths, weights

N_BASE = 192
EMB = ("model.embed_tokens.weight", "lm_head.weight")
RUN = {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 6, "warmup_steps": 1, "lr": 5e-2,
       "min_lr": 5e-3, "weight_decay": 0.1, "checkpoint_every": 100, "log_every": 1, "loss_spike_factor": None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("modeling")
    out = {"root": root, "data": make_data(root / "data")}
    for key, tied in (("untied", False), ("tied", True)):
        d = make_model(root / key, tied=tied)
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, modeling.BASE_VOCAB_KEY: N_BASE}))
        out[key] = d
    return out


def test_no_weight_decay_on_embeddings_and_norms(tiny):
    model = modeling.load_model(tiny["untied"], "sdpa")
    modeling.set_trainable(model, "all")
    decay, no_decay = modeling.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no = {names[id(p)] for p in no_decay["params"]}
    assert set(EMB) <= no and all(n in no for n in names.values() if "norm" in n)
    assert all(p.dim() == 2 and names[id(p)] not in EMB for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    modeling.set_trainable(model, "embeddings_only")
    assert [g["weight_decay"] for g in modeling.param_groups(model, 0.1)] == [0.0]  # no empty decay group


@pytest.mark.parametrize("key,precision", [("untied", "fp32"), ("tied", "bf16")])
def test_new_embeddings_only_keeps_every_base_row_bit_identical(tiny, key, precision):
    p = paths(tiny["root"], tiny[key], tiny["data"], f"new_rows_{key}")
    stats = train.run(from_dict(TrainStageConfig, {**RUN, "trainable": "new_embeddings_only",
                                                   "precision": precision}), p)
    assert stats["step"] == 6
    before, after = load_file(str(tiny[key] / "model.safetensors")), weights(p)
    assert before.keys() == after.keys()
    for k in before:
        if k in EMB:
            assert torch.equal(after[k][:N_BASE], before[k][:N_BASE]), k  # base rows: every bit
            moved = (after[k][N_BASE:] != before[k][N_BASE:]).any(dim=1)
            assert moved.all(), f"{k}: new rows {torch.nonzero(~moved).flatten().tolist()} did not train"
        else:
            assert torch.equal(after[k], before[k]), k  # the body is frozen
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]  # the new rows learn
    manifest = json.loads(p.stats.read_text())
    n_emb = 1 if key == "tied" else 2
    assert manifest["summary"]["trainable_params"] == n_emb * (256 - N_BASE) * 32
    # and the config key travels on, for a later stage of the same kind
    assert json.loads((p.output_dir / "config.json").read_text())[modeling.BASE_VOCAB_KEY] == N_BASE


def test_new_embeddings_only_under_two_process_ddp(tiny):
    """The same invariant with gradients all-reduced by DDP over gloo (torchrun, 2 processes)."""
    import os
    import subprocess
    import sys

    from support.training import REPO

    p = paths(tiny["root"], tiny["untied"], tiny["data"], "new_rows_ddp")
    params = {**RUN, "trainable": "new_embeddings_only", "precision": "fp32", "max_steps": 3}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "cptflow.train.train", "--model", str(p.model), "--data", str(p.data), "--output-dir", str(p.output_dir),
           "--checkpoint-dir", str(p.checkpoint_dir), "--metrics", str(p.metrics), "--stats", str(p.stats),
           "--params", json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, after = load_file(str(tiny["untied"] / "model.safetensors")), weights(p)
    assert json.loads(p.stats.read_text())["summary"]["world_size"] == 2
    for k in EMB:
        assert torch.equal(after[k][:N_BASE], before[k][:N_BASE]), k
        assert not torch.equal(after[k][N_BASE:], before[k][N_BASE:]), k
    assert all(torch.equal(after[k], before[k]) for k in before if k not in EMB)


def test_switching_modes_removes_the_row_hook(tiny):
    model = modeling.load_model(tiny["untied"], "sdpa")
    assert modeling.set_trainable(model, "new_embeddings_only") == 2 * (256 - N_BASE) * 32
    assert modeling.set_trainable(model, "embeddings_only") == 2 * 256 * 32
    ids = torch.arange(0, 256).view(4, 64) % 256
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad[:N_BASE].abs().sum() > 0  # no stale hook zeroes base rows


def test_new_embeddings_only_needs_new_rows(tmp_path, tiny):
    with pytest.raises(ValueError, match="cptflow_base_vocab_size"):
        modeling.set_trainable(modeling.load_model(make_model(tmp_path / "plain"), "sdpa"), "new_embeddings_only")
    model = modeling.load_model(tiny["untied"], "sdpa")
    setattr(model.config, modeling.BASE_VOCAB_KEY, 256)  # vocab.method none: nothing new
    with pytest.raises(ValueError, match="no new row would train"):
        modeling.set_trainable(model, "new_embeddings_only")
