"""MFU formula, the device peak table, throughput, and the resumable per-step metrics log."""

import json
import time

import pytest

from cptflow.model import modeling
from cptflow.train import metrics


def test_flops_per_token_is_6n_plus_12lht():
    # LLaMA-2-7B-like: N = 6.48e9 non-embedding, L = 32, H = 4096, T = 4096
    assert metrics.flops_per_token(6_476_005_376, 32, 4096, 4096) == 6 * 6_476_005_376 + 12 * 32 * 4096 * 4096


@pytest.mark.parametrize("tied", [False, True])
def test_mfu_counts_lm_head_but_not_the_embedding_lookup(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied: the shared matrix is counted once
    body = total - 1000 * 32 * (1 if tied else 2)
    assert modeling.non_embedding_params(model) == body
    assert modeling.matmul_params(model) == body + 1000 * 32  # lm_head does a matmul per token, tied or not


def test_mfu_uses_peak_of_all_devices():
    f = metrics.flops_per_token(1_000_000, 2, 64, 128)
    peak = metrics.peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert peak == 989e12
    # 8 GPUs at 1e6 tokens/s each: MFU is per-device utilisation, not 8x it.
    assert metrics.mfu(8e6, f, peak, 8) == pytest.approx(1e6 * f / 989e12)
    assert metrics.mfu(1000.0, f, None, 1) is None


def test_peak_table_and_override():
    assert metrics.peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # specific name before the generic H100
    assert metrics.peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert metrics.peak_flops("NVIDIA A100-SXM4-80GB", "fp32") is None  # TF32 vs fp32: no guess
    assert metrics.peak_flops(None, "bf16") is None  # CPU
    assert metrics.peak_flops("Some Future GPU", "bf16") is None
    assert metrics.peak_flops(None, "fp32", peak_tflops=2.5) == 2.5e12  # config wins, even on CPU


def test_throughput_and_eta():
    t = metrics.Throughput()
    assert t.step(1000) > 0
    t.step(1000)
    assert t.tokens_total == 2000 and t.steps_total == 2
    assert t.eta_s(0) == 0
    assert t.eta_s(10) == pytest.approx(10 * (t.last - t.start) / 2)


def test_throughput_leaves_checkpoint_time_out():
    t = metrics.Throughput()
    time.sleep(0.05)
    t.step(1000)
    with t.excluded():  # a checkpoint save
        time.sleep(0.3)
    time.sleep(0.05)
    rate = t.step(1000)
    assert rate > 1000 / 0.2  # the interval was ~0.05 s, not ~0.35 s
    assert t.excluded_s >= 0.3 and t.elapsed_s() < 0.25
    assert t.mean_tokens_per_s() == pytest.approx(2000 / t.elapsed_s())


def test_metrics_log_resume_drops_rows_after_checkpoint(tmp_path):
    live = tmp_path / "live.jsonl"
    m = metrics.MetricsLog(live, tb_dir=tmp_path / "tb")
    for s in (1, 2, 3):
        m.add({"step": s, "loss": 5.0 - s, "skipped": False, "grad_norm": None})
    m.close()
    assert [r["step"] for r in metrics.read_rows(live)] == [1, 2, 3]
    assert list((tmp_path / "tb").iterdir())  # event file written
    # The run died after step 3 but its last checkpoint held rows 1-2: the live file restarts from those.
    m2 = metrics.MetricsLog(live, rows=metrics.read_rows(live)[:2], tb_dir=tmp_path / "tb")
    m2.add({"step": 3, "loss": 1.5, "skipped": True, "grad_norm": None})
    m2.close()
    rows = [json.loads(x) for x in live.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 1.5
