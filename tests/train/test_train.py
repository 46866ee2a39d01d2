"""train/<stage>: real DDP over gloo, kill-and-resume, frozen bodies, the spike guard, config and schema.

Runs use a tiny LLaMA (hidden 32, 2 layers, vocab 256) on 24 packed samples of 32 tokens, fp32, one
thread per process. Equality claims are bit for bit (torch.equal): with a global batch of 2 and a
micro-batch of 1, one process accumulates g0 + g1 in autograd while two processes add the same two
fp32 gradients in gloo's all-reduce (a + b == b + a exactly; the x2 / 2 of DDP's averaging is exact
in binary floating point), and every kernel sees the same shapes on one thread. Wider global batches
re-associate the sums and would need a tolerance (~1e-5 after 10 Adam steps at lr 1e-2, measured).
"""

import json
import math

import jsonschema
import pytest
import torch
from safetensors.torch import load_file

from cptflow.model import modeling
from cptflow.train import checkpoint, deepspeed_config, train
from cptflow.core.config import ConfigError, from_dict, to_dict
from cptflow.train.config import TrainConfig, TrainStageConfig, resolve_stage, stage_names
from cptflow.train.spike_guard import SpikeGuard
from conftest import schema_section
from support.training import BASE, REPO, kill_after_checkpoint, paths, run_inproc, samples, torchrun, weights

EMB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def baseline(tiny):
    """One process, uninterrupted: the reference for the DDP and kill tests."""
    dbg = tiny["root"] / "baseline_samples"
    dbg.mkdir()
    return run_inproc(tiny, "baseline", hooks=train.DebugHooks(samples_dir=dbg)), samples(dbg)


def test_single_process_run_writes_all_outputs(tiny, baseline):
    p, seen = baseline
    assert sorted(f.name for f in p.output_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer_config.json"]
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "samples_seen", "skipped",
                            "mfu", "data_wait_s", "peak_mem_gib"}
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1  # it learns something in 12 steps
    assert rows[-1]["samples_seen"] == 24 and rows[0]["mfu"] is None  # CPU: no peak, no MFU
    assert rows[0]["peak_mem_gib"] is None and all(r["data_wait_s"] >= 0 for r in rows)
    # tokens_seen counts real tokens only: 24 samples x 32, less 4 padding positions in every third sample
    assert rows[-1]["tokens_seen"] == 24 * 32 - 8 * 4
    # One pass over 24 samples: each exactly once, bucket 0 (rows 0-11) entirely before bucket 1.
    order = [i for s in sorted(seen) for i in seen[s][0]]
    assert sorted(order) == list(range(24)) and order[:12] != list(range(12)) and sorted(order[:12]) == list(range(12))
    manifest = json.loads(p.stats.read_text())
    assert manifest["stage"] == "train/train" and manifest["counts"]["step"] == 12
    assert manifest["summary"]["world_size"] == 1 and manifest["summary"]["attention"] == "sdpa"
    assert list(p.tensorboard_dir.iterdir())
    ckpts = checkpoint.complete_checkpoints(next(p.checkpoint_dir.glob("run-*")))
    assert [s for s, _ in ckpts] == [8, 12]  # keep_last 2 of 4, 8, 12


def test_two_process_ddp_matches_one_process(tiny, baseline):
    base, base_seen = baseline
    p = paths(tiny["root"], tiny["model"], tiny["data"], "ddp")
    proc = torchrun(2, p, BASE, "--debug-samples", str(tiny["root"] / "ddp_samples"))
    proc.wait(timeout=300)
    out = (p.output_dir.parent / "torchrun.log").read_text()
    assert proc.returncode == 0, out
    assert "world size 2" in out and "backend gloo" in out and "[rank 0]" in out
    seen = samples(tiny["root"] / "ddp_samples")
    assert sorted(seen) == list(range(1, 13))
    for step, by_rank in seen.items():
        assert not set(by_rank[0]) & set(by_rank[1])  # disjoint
        assert [by_rank[0][0], by_rank[1][0]] == base_seen[step][0]  # rank r takes sample r of the global batch
    a, b = weights(base), weights(p)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x)["loss"] for x in base.metrics.read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in p.metrics.read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-12)


def test_resume_continues_at_same_data_position(tiny, baseline):
    """SIGKILL a 2-process run after a checkpoint, rerun with 1 process: same samples, same final weights."""
    base, base_seen = baseline
    p = paths(tiny["root"], tiny["model"], tiny["data"], "killed")
    dbg = tiny["root"] / "killed_samples"
    proc = torchrun(2, p, BASE, "--debug-samples", str(dbg), "--debug-step-delay-s", "0.5")
    kill_after_checkpoint(proc, p, 4)
    assert proc.returncode != 0 and not p.output_dir.exists()
    rdir = next(p.checkpoint_dir.glob("run-*"))
    last = checkpoint.complete_checkpoints(rdir)[-1][0]
    assert last in (4, 8)
    (rdir / "step_00000011").mkdir()  # a step-named dir without marker: must be ignored
    (rdir / ".step_00000012.tmp").mkdir()  # a save that died mid-write: must be cleaned up
    run_inproc(tiny, "killed", hooks=train.DebugHooks(samples_dir=dbg))
    seen_after = [json.loads(x) for x in (dbg / "rank0.jsonl").read_text().splitlines()]
    first_resumed = [r["step"] for r in seen_after if "ids" in r and len(r["ids"]) == 2][0]
    assert first_resumed == last + 1  # no replay, no gap
    for r in seen_after:
        if len(r["ids"]) == 2:  # the 1-process rerun: the same global samples as the uninterrupted run
            assert r["ids"] == base_seen[r["step"]][0]
    a, b = weights(base), weights(p)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert json.loads(p.stats.read_text())["summary"]["resumed_from_step"] == last
    assert not (rdir / ".step_00000012.tmp").exists()
    state = json.loads((rdir / "step_00000012" / "state.json").read_text())
    assert state["samples_seen"] == 24 and state["world_size"] == 1


def test_changed_global_batch_refuses_to_resume(tiny, baseline):
    base, _ = baseline
    p = paths(tiny["root"], tiny["model"], tiny["data"], "baseline")
    with pytest.raises(ValueError, match="set global_batch_size: 2 to resume"):
        train.run(from_dict(TrainStageConfig, {**BASE, "global_batch_size": 4}), p)


def test_embeddings_only_freezes_body_then_full_stage_trains_it(tiny):
    for key in ("model", "tied"):
        src = tiny[key]
        p1 = run_inproc(tiny, f"embed_{key}", {"trainable": "embeddings_only", "max_steps": 4}, model=src)
        before, after = load_file(str(src / "model.safetensors")), weights(p1)
        assert before.keys() == after.keys()
        for k in before:
            changed = not torch.equal(before[k], after[k])
            assert changed == (k in EMB), k  # body bit-identical, embeddings (and untied lm_head) moved
        p2 = run_inproc(tiny, f"full_{key}", {"trainable": "all", "max_steps": 4}, model=p1.output_dir)
        final = weights(p2)
        assert all(not torch.equal(after[k], final[k]) for k in final), "the full stage must train every tensor"
        if key == "tied":
            assert "lm_head.weight" not in final  # still tied on export
            assert json.loads((p2.output_dir / "config.json").read_text())["tie_word_embeddings"] is True


def test_selection_bf16_and_gradient_checkpointing(tiny):
    """categories/buckets restrict the samples; bf16 autocast + recomputation run on CPU and learn."""
    dbg = tiny["root"] / "sel_samples"
    dbg.mkdir()
    p = run_inproc(tiny, "sel", {"categories": ["zh_web"], "buckets": [1], "precision": "bf16",
                                 "gradient_checkpointing": True, "max_steps": None, "lr": 3e-2},
                   hooks=train.DebugHooks(samples_dir=dbg))
    ids = [i for step in samples(dbg).values() for i in step[0]]
    assert sorted(ids) == list(range(12, 24, 2))  # bucket 1 rows of zh_web (even rows), one pass: 3 steps
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert json.loads(p.stats.read_text())["summary"]["precision"] == "bf16"
    assert weights(p)["lm_head.weight"].dtype == torch.float32  # exported in the input's stored dtype


def test_compile_trains_like_eager(tiny):
    """torch.compile per decoder layer (inductor on CPU: ~15 s of compiling here) changes rounding only."""
    eager = run_inproc(tiny, "eager3", {"max_steps": 3, "prefetch_batches": 0})
    compiled = run_inproc(tiny, "compiled3", {"max_steps": 3, "compile": True})
    la = [json.loads(x)["loss"] for x in eager.metrics.read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in compiled.metrics.read_text().splitlines()]
    assert lb == pytest.approx(la, rel=1e-5)
    a, b = weights(eager), weights(compiled)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert json.loads(compiled.stats.read_text())["params"]["compile"] is True


@pytest.mark.parametrize("key", ["model", "tied"])
def test_set_trainable_really_unfreezes(tiny, key):
    model = modeling.load_model(tiny[key], "sdpa")
    n_emb = modeling.set_trainable(model, "embeddings_only")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == ({"model.embed_tokens.weight"} if key == "tied" else set(EMB))
    assert n_emb == sum(p.numel() for p in modeling.embedding_params(model))
    assert modeling.set_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    if key == "tied":
        assert model.lm_head.weight.requires_grad and model.lm_head.weight is model.model.embed_tokens.weight


def test_loss_spike_is_skipped_and_counted(tiny):
    p = run_inproc(tiny, "spike", {"loss_spike_factor": 3.0, "loss_spike_window": 3, "checkpoint_every": 1,
                                   "keep_last": 0, "max_steps": 7},
                   hooks=train.DebugHooks(spike_steps=(6,)))
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False] * 5 + [True, False]
    assert rows[5]["loss"] > 100 * rows[4]["loss"] and rows[5]["grad_norm"] is None
    assert json.loads(p.stats.read_text())["counts"]["skipped_spike"] == 1
    rdir = next(p.checkpoint_dir.glob("run-*"))
    w = {s: load_file(str(rdir / f"step_{s:08d}" / "model.safetensors")) for s in (5, 6, 7)}
    assert all(torch.equal(w[5][k], w[6][k]) for k in w[5])  # the update of step 6 was not applied
    assert not all(torch.equal(w[6][k], w[7][k]) for k in w[6])  # training goes on
    o5, o6, o7 = (torch.load(rdir / f"step_{s:08d}" / "optimizer.pt", weights_only=True)["optimizer"]
                  for s in (5, 6, 7))
    for key in ("exp_avg", "exp_avg_sq", "step"):  # AdamW's state did not absorb the spike either
        assert all(torch.equal(o5["state"][i][key], o6["state"][i][key]) for i in o5["state"]), key
    assert all(int(o7["state"][i]["step"]) == int(o6["state"][i]["step"]) + 1 == 6 for i in o6["state"])


def test_spike_guard_rules():
    g = SpikeGuard(factor=2.0, window=3)
    assert all(g.accept(x) for x in (10.0, 100.0, 1.0))  # window not full yet: no verdicts
    assert not g.accept(200.0) and g.accept(60.0)  # mean 37 -> threshold 74
    assert not g.accept(float("nan"))
    assert not SpikeGuard(None, 3).accept(float("inf"))  # non-finite is skipped even with the guard off
    g2 = SpikeGuard(2.0, 2, history=[1.0, 1.0])
    assert not g2.accept(5.0)
    with pytest.raises(ValueError, match="a shift, not a spike"):
        g2.accept(5.0)


def test_plan_steps_and_batch_layout():
    cfg = TrainStageConfig(micro_batch_size=2, global_batch_size=8)
    assert cfg.batch_layout(2) == (2, 8) and cfg.batch_layout(4) == (1, 8)
    with pytest.raises(ConfigError, match="not a multiple"):
        cfg.batch_layout(3)
    assert TrainStageConfig(micro_batch_size=2, grad_accum_steps=3).batch_layout(2) == (3, 12)
    assert train.plan_steps(TrainStageConfig(max_tokens=1000), 50, 32, 4) == math.ceil(1000 / 128)
    assert train.plan_steps(TrainStageConfig(), 50, 32, 4) == 12
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train.plan_steps(TrainStageConfig(), 3, 32, 4)


@pytest.mark.parametrize("bad,msg", [({"trainable": "body"}, "trainable"), ({"max_steps": 3, "max_tokens": 9}, "not both"),
                                     ({"lr": 1e-4, "min_lr": 1e-3}, "min_lr"), ({"loss_spike_factor": 0.5}, "spike"),
                                     ({"lrr": 1}, "unknown key")])
def test_bad_stage_config_is_rejected(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        from_dict(TrainStageConfig, bad)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    rc = train.main(["--model", "m", "--data", "d", "--output-dir", "o", "--checkpoint-dir", "c", "--metrics", "x",
                     "--stats", "s", "--params", '{"precision": "fp64"}', "--log", str(tmp_path / "l.log")])
    assert rc == 2 and "precision" in capsys.readouterr().err


def test_schema_fragment_matches_dataclasses():
    schema = schema_section("train")
    props = schema["properties"]
    defaults = to_dict(TrainConfig())
    assert set(props) == set(defaults)
    assert {k: v["default"] for k, v in props.items()} == defaults
    stage_props = props["stages"]["items"]["properties"]
    assert set(stage_props) == {f for f in to_dict(TrainStageConfig())}
    assert not any("default" in v for v in stage_props.values())  # would mask the common settings
    section = {"precision": "fp32", "stages": [{"name": "a", "trainable": "embeddings_only"}, {"name": "b", "lr": 1e-5}]}
    jsonschema.validate({**defaults, **section}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"stages": [{"name": "a", "lrr": 1}]}, schema)


def test_resolve_stage_merges_common_and_stage_settings():
    section = {"precision": "fp32", "lr": 3e-4, "stages": [{"name": "embed", "trainable": "embeddings_only", "lr": 1e-3},
                                                           {"name": "full"}]}
    assert stage_names(section) == ["embed", "full"]
    e, f = resolve_stage(section, "embed"), resolve_stage(section, "full")
    assert (e["lr"], e["trainable"], e["precision"]) == (1e-3, "embeddings_only", "fp32")
    assert (f["lr"], f["trainable"], f["precision"]) == (3e-4, "all", "fp32")
    assert from_dict(TrainStageConfig, f).betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="duplicate"):
        stage_names({"stages": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match="no stage named"):
        resolve_stage(section, "zzz")
    assert stage_names({}) == ["embed_align", "full"]


def test_deepspeed_configs_fill_autos_and_reject_conflicts(tmp_path):
    cfg = TrainStageConfig(precision="bf16", grad_clip=1.0)
    for stage in (1, 2, 3):
        ds = deepspeed_config.load_deepspeed_config(REPO / f"config/deepspeed/zero{stage}.json", cfg, 4, 2, 8)
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 4, 2)
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
        assert ds["zero_allow_untested_optimizer"] is True
        assert "auto" not in json.dumps(ds)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu = 16 conflicts"):
        deepspeed_config.load_deepspeed_config(bad, cfg, 4, 2, 8)
