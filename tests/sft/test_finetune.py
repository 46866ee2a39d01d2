"""finetune: LoRA on every linear layer, merged weights equal to peft's own merge, a kill -9 resumed at the same
sample, FSDP2 as well as DDP, the training loop's spike guard, full fine-tuning, QLoRA detected (falling back to
LoRA here, on CPU without bitsandbytes).

A tiny LLaMA (2 layers, hidden 32) over the demo tokenizer learns from the real Firefly conversations packed
into rows of 128 tokens, fp32, one thread per process. Equality claims are bit for bit, as in tests/train:
a global batch of 2 split as micro-batch 1 x 2 processes adds the same two fp32 gradients as one process
accumulating them, and LoRA dropout is 0 so no random stream differs between the two layouts.
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import schema_section
from cptflow.core.config import ConfigError, from_dict, to_dict
from cptflow.core.schema import validate_with_defaults
from cptflow.model import modeling
from cptflow.sft import finetune, lora, packed, sft_pack
from cptflow.sft.config import FinetuneConfig, SftConfig
from cptflow.train import checkpoint
from cptflow.train.loss import CausalLMLoss
from support.sft import TOKENIZER, firefly_messages, make_chat_model, write_conversations
from support.training import REPO, kill_job, samples

BASE = {"precision": "fp32", "micro_batch_size": 1, "global_batch_size": 2, "max_steps": 6, "lr": 1e-2,
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "checkpoint_every": 2, "keep_last": 2, "log_every": 2,
        "seed": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    src = write_conversations(root / "c.jsonl", firefly_messages())
    sft_pack.run(sft_pack.SftPackConfig(max_length=128), TOKENIZER, [src], root / "data", root / "t.jinja",
                 root / "counts.json")
    return {"root": root, "model": make_chat_model(root / "model"), "data": root / "data", "template": root / "t.jinja"}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the OMP_NUM_THREADS=1 torchrun workers
    yield
    torch.set_num_threads(n)


def paths(tiny, name: str, model: Path | None = None) -> finetune.FinetunePaths:
    out = tiny["root"] / name
    return finetune.FinetunePaths(model or tiny["model"], tiny["data"], tiny["template"], out / "model", out / "ckpt",
                                  out / "metrics.jsonl", out / "stats.json", out / "adapter", out / "tb")


def run_inproc(tiny, name, params=None, samples: Path | None = None) -> finetune.FinetunePaths:
    p = paths(tiny, name)
    finetune.run(from_dict(FinetuneConfig, {**BASE, **(params or {})}), p, finetune.DebugHooks(samples))
    return p


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def masked_loss(model_dir: Path, data: Path, rows: list[int]) -> float:
    """Mean loss over the assistant tokens of ``rows``, by the training stage's loss."""
    model = modeling.load_model(model_dir, "sdpa").eval()
    ds, length = packed.open_rows(data)
    batch = {k: torch.from_numpy(v) for k, v in packed.load_rows(ds, np.array(rows), length).items()}
    with torch.no_grad():
        total = CausalLMLoss(model, "sdpa", 256)(batch["input_ids"], batch["position_ids"], batch["labels"])
    return float(total) / int((batch["labels"][:, 1:] != -100).sum())


@pytest.fixture(scope="module")
def baseline(tiny):
    dbg = tiny["root"] / "baseline_samples"
    dbg.mkdir()
    return run_inproc(tiny, "baseline", samples=dbg), samples(dbg)


def test_lora_trains_only_adapters_and_releases_model_and_adapter(tiny, baseline):
    p, seen = baseline
    assert sorted(f.name for f in p.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                "chat_template.jinja"]
    conf = json.loads((p.adapter_dir / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == str(tiny["model"])
    # every linear layer of every block, not the output layer
    linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(conf["target_modules"]) == 14 and {m.rsplit(".", 1)[-1] for m in conf["target_modules"]} == linear
    start, merged = weights(tiny["model"]), weights(p.output_dir)
    changed = {k for k in start if not torch.equal(start[k], merged[k])}
    assert changed == {f"model.layers.{i}.{part}.{m}.weight" for i in range(2) for m in linear
                       for part in (("self_attn",) if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else ("mlp",))}
    template = tiny["template"].read_text(encoding="utf-8")
    assert json.loads((p.output_dir / "tokenizer_config.json").read_text())["chat_template"] == template
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["samples_seen"] == 12
    order = [i for s in sorted(seen) for i in seen[s][0]]
    assert len(set(order)) == 12  # 12 distinct rows of the 33: one pass, shuffled
    summary = json.loads(p.stats.read_text())["summary"]
    assert summary["method"] == "lora" and 0 < summary["trainable_params"] < summary["params"] / 10
    # it learned the rows it saw: their masked loss fell
    assert masked_loss(p.output_dir, tiny["data"], order) < masked_loss(tiny["model"], tiny["data"], order) - 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merged_weights_equal_peft_merge_and_unload(tiny, baseline, dtype, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p, _ = baseline
    start = tiny["model"]
    if dtype != torch.float32:  # the same start model stored in bf16, merged both ways
        start = tmp_path / "bf16"
        AutoModelForCausalLM.from_pretrained(str(tiny["model"]), dtype=dtype).save_pretrained(str(start))
    ours = tmp_path / "merged"
    assert lora.merge_adapter(start, p.adapter_dir, ours) == 14
    model = AutoModelForCausalLM.from_pretrained(str(start), dtype=dtype)
    ref = PeftModel.from_pretrained(model, str(p.adapter_dir)).merge_and_unload().state_dict()
    mine = weights(ours)
    assert set(mine) == set(ref)
    for k in ref:
        assert mine[k].dtype == dtype and torch.equal(mine[k], ref[k]), k
    assert (ours / "config.json").read_bytes() == (start / "config.json").read_bytes()


def torchrun(p: finetune.FinetunePaths, params: dict, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cptflow.sft.finetune", "--model", str(p.model), "--data", str(p.data), "--template", str(p.template),
           "--output-dir", str(p.output_dir), "--adapter-dir", str(p.adapter_dir), "--checkpoint-dir",
           str(p.checkpoint_dir), "--metrics", str(p.metrics), "--stats", str(p.stats), "--params", json.dumps(params),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    p.output_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(p.output_dir.parent / "torchrun.log", "w")  # a file, not a pipe: a full pipe would block
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def test_sft_resumes_after_kill_9_at_the_same_sample(tiny, baseline):
    """SIGKILL a 2-process run after a checkpoint, rerun with 1 process: same rows, same adapter, same model."""
    base, base_seen = baseline
    p = paths(tiny, "killed")
    dbg = tiny["root"] / "killed_samples"
    proc = torchrun(p, BASE, "--debug-samples", str(dbg), "--debug-step-delay-s", "0.5")
    deadline = time.time() + 300
    while not list(p.checkpoint_dir.glob("run-*/step_00000002/COMPLETE")):
        assert proc.poll() is None and time.time() < deadline, (p.output_dir.parent / "torchrun.log").read_text()
        time.sleep(0.05)
    kill_job(proc)
    assert proc.returncode != 0 and not p.output_dir.exists()
    rdir = next(p.checkpoint_dir.glob("run-*"))
    last = checkpoint.complete_checkpoints(rdir)[-1][0]
    assert last in (2, 4)
    assert sorted(f.name for f in (rdir / f"step_{last:08d}").iterdir()) == [
        "COMPLETE", "metrics.jsonl", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt", "state.json",
        "trainable.safetensors"]  # the adapter and its optimizer state, not the frozen model
    run_inproc(tiny, "killed", samples=dbg)
    after = [json.loads(x) for x in (dbg / "rank0.jsonl").read_text().splitlines()]
    resumed = [r for r in after if len(r["ids"]) == 2]  # the 1-process rerun takes whole global batches
    assert resumed[0]["step"] == last + 1  # no replay, no gap
    assert all(r["ids"] == base_seen[r["step"]][0] for r in resumed)
    a, b = weights(base.output_dir), weights(p.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(base.adapter_dir / "adapter_model.safetensors")).keys() == \
        load_file(str(p.adapter_dir / "adapter_model.safetensors")).keys()
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert json.loads(p.stats.read_text())["summary"]["resumed_from_step"] == last


def test_fsdp_two_processes_match_ddp(tiny, baseline):
    """engine fsdp (FSDP2 over gloo, 2 processes): the same adapter and merged model as the one-process DDP run,
    to the sharded grad-norm reduction's rounding; its checkpoints are DCP shards of the whole module."""
    base, _ = baseline
    p = paths(tiny, "fsdp")
    proc = torchrun(p, {**BASE, "engine": "fsdp"})
    proc.wait(timeout=300)
    log = (p.output_dir.parent / "torchrun.log").read_text()
    assert proc.returncode == 0, log
    assert "FSDP2" in log and "backend gloo" in log
    final = checkpoint.latest(next(p.checkpoint_dir.glob("run-*")))
    assert sorted(f.name for f in (final / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for a, b in ((weights(base.output_dir), weights(p.output_dir)),
                 (load_file(str(base.adapter_dir / "adapter_model.safetensors")),
                  load_file(str(p.adapter_dir / "adapter_model.safetensors")))):
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert json.loads(p.stats.read_text())["summary"]["engine"] == "fsdp"


def test_a_loss_spike_is_skipped_leaving_adapter_and_optimizer_untouched(tiny):
    """The training loop's spike guard serves SFT too: step 6's loss x1000 is skipped, counted, and the trainable
    tensors and AdamW state after it are bit-identical to those before it."""
    p = paths(tiny, "spike")
    params = {**BASE, "checkpoint_every": 1, "keep_last": 0, "loss_spike_window": 2}
    finetune.run(from_dict(FinetuneConfig, params), p, finetune.DebugHooks(spike_steps=(6,)))
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False] * 5 + [True] and rows[-1]["grad_norm"] is None
    assert json.loads(p.stats.read_text())["counts"]["skipped_spike"] == 1
    rdir = next(p.checkpoint_dir.glob("run-*"))
    before, after = rdir / "step_00000005", rdir / "step_00000006"
    a, b = load_file(str(before / "trainable.safetensors")), load_file(str(after / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(d / "optimizer.pt", weights_only=True)["optimizer"]["state"] for d in (before, after))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])


def test_full_fine_tuning_trains_every_weight(tiny):
    p = run_inproc(tiny, "full", {"method": "full", "max_steps": 2, "lr": 1e-3})
    assert not p.adapter_dir.exists()
    start, tuned = weights(tiny["model"]), weights(p.output_dir)
    assert all(not torch.equal(start[k], tuned[k]) for k in start if not k.endswith("norm.weight"))
    assert json.loads(p.stats.read_text())["summary"]["trainable_params"] == sum(v.numel() for v in start.values())


def test_qlora_is_detected_and_falls_back_to_lora_where_it_cannot_run(tiny, caplog):
    cfg = FinetuneConfig(method="qlora")
    with caplog.at_level(logging.WARNING, logger="cptflow.sft.lora"):
        assert lora.resolve_method(cfg, torch.device("cpu")) == "lora"
    assert "a CUDA device and the bitsandbytes package" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cptflow.sft.lora"):  # a GPU without bitsandbytes installed
        assert lora.resolve_method(cfg, torch.device("cuda", 0)) == "lora"
    assert "bitsandbytes" in caplog.text and "CUDA device" not in caplog.text
    assert lora.resolve_method(FinetuneConfig(method="full"), torch.device("cpu")) == "full"
    p = run_inproc(tiny, "qlora", {"method": "qlora", "max_steps": 1})
    summary = json.loads(p.stats.read_text())["summary"]
    assert (summary["method_requested"], summary["method"]) == ("qlora", "lora")
    assert (p.adapter_dir / "adapter_model.safetensors").is_file()


def test_bf16_lora_with_gradient_checkpointing_keeps_the_stored_dtype(tiny):
    """The demo's setting: frozen base held in bf16, fp32 adapters under autocast, activations recomputed."""
    p = run_inproc(tiny, "bf16", {"precision": "bf16", "gradient_checkpointing": True, "max_steps": 2})
    rows = [json.loads(x) for x in p.metrics.read_text().splitlines()]
    assert all(r["loss"] is not None and r["grad_norm"] > 0 for r in rows)
    assert load_file(str(p.adapter_dir / "adapter_model.safetensors"))[
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].dtype == torch.float32
    assert {t.dtype for t in weights(p.output_dir).values()} == {torch.float32}  # as the start model stores it


def test_schema_section_matches_the_dataclasses():
    filled = validate_with_defaults({"sources": [{"name": "s", "category": "c", "paths": ["x/*.jsonl"]}],
                                     "benchmarks": [], "heldout": {}})
    assert filled["sft"] == to_dict(SftConfig())
    assert schema_section("sft")["properties"]["finetune"]["properties"].keys() == to_dict(FinetuneConfig()).keys()
    from_dict(SftConfig, filled["sft"], "sft")
    for shipped in (REPO / "config" / "demo.yaml", REPO / "tests" / "configs" / "tiny.yaml"):
        cfg = validate_with_defaults(yaml.safe_load(shipped.read_text(encoding="utf-8")))
        assert from_dict(SftConfig, cfg["sft"], "sft").sources[0].name == "firefly", shipped
    for bad, msg in (({"method": "qlora4"}, "method"), ({"lora_dropout": 1.0}, "lora_dropout"),
                     ({"max_steps": 0}, "max_steps"), ({"lora_rank": 8}, "unknown key")):
        with pytest.raises(ConfigError, match=msg):
            from_dict(FinetuneConfig, bad, "sft.finetune")
