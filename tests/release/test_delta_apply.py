"""Release deltas: apply(base, make(base, adapted)) == adapted byte for byte; wrong inputs fail loudly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from cptflow.model import safetensors_io
from cptflow.release import delta_apply, delta_make, delta_scheme
from cptflow.core.io import read_json, sha256_path
from support.release import BASE_VOCAB, adapt, same_dirs, save, tiny


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_delta_round_trip_is_bit_exact(models, tmp_path, dtype, layout):
    base, adapted = models / f"base_{dtype}", models / f"adapted_{dtype}_{layout}"
    if layout == "sharded":
        assert len(list(adapted.glob("model-*.safetensors"))) >= 3
    cfg = delta_scheme.DeltaConfig(max_shard_mb=1)
    stats, _, _ = delta_make.make(cfg, base, adapted, tmp_path / "delta")
    assert stats["tensors_expanded"] == 2 and stats["rows_new"] == 2 * 128
    assert len(list((tmp_path / "delta").glob("delta-*.safetensors"))) >= 2
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "delta" / f).read_bytes() == (adapted / f).read_bytes()
    # New vocabulary rows are stored whole (bit patterns of the adapted rows).
    idx = read_json(tmp_path / "delta" / delta_scheme.DELTA_INDEX)["weight_map"]
    d = load_file(tmp_path / "delta" / idx["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    a = safetensors_io.read_tensor(safetensors_io.tensor_index(adapted)["model.embed_tokens.weight"][0], "model.embed_tokens.weight")
    assert torch.equal(d[BASE_VOCAB:], delta_scheme.bits_of(a)[BASE_VOCAB:])
    assert d.dtype == (torch.int16 if dtype == "bf16" else torch.int32)
    stats, _, _ = delta_apply.apply_cptflow(cfg, base, tmp_path / "delta", tmp_path / "rebuilt")
    assert stats["files_verified"] == len(list(adapted.iterdir()))
    same_dirs(adapted, tmp_path / "rebuilt")


def test_base_of_another_dtype_round_trips(models, tmp_path, tokenizer):
    """A bf16 model released from an fp32 base: the base is cast first, still bit-exact."""
    cfg = delta_scheme.DeltaConfig()
    delta_make.make(cfg, models / "base_fp32", models / "adapted_bf16_single", tmp_path / "delta")
    delta_apply.apply_cptflow(cfg, models / "base_fp32", tmp_path / "delta", tmp_path / "out")
    same_dirs(models / "adapted_bf16_single", tmp_path / "out")


def test_wrong_base_weights_name_the_file(models, tmp_path, tokenizer):
    cfg = delta_scheme.DeltaConfig()
    delta_make.make(cfg, models / "base_bf16", models / "adapted_bf16_single", tmp_path / "delta")
    other = save(tiny(7, torch.bfloat16), tokenizer, tmp_path / "other")  # same shapes, other weights
    with pytest.raises(ValueError, match=r"other/model\.safetensors: sha256 .* wrong base"):
        delta_apply.apply_cptflow(cfg, other, tmp_path / "delta", tmp_path / "out")
    # Without the base check, the output check still refuses and leaves nothing behind.
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 .* after apply differs"):
        delta_apply.apply_cptflow(delta_scheme.DeltaConfig(verify_base=False), other, tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_truncated_file_is_named(models, tmp_path):
    adapted = tmp_path / "adapted"
    shutil.copytree(models / "adapted_bf16_sharded", adapted)
    shard = sorted(adapted.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{shard.name}: truncated safetensors file"):
        delta_make.make(delta_scheme.DeltaConfig(), models / "base_bf16", adapted, tmp_path / "delta")
    assert not (tmp_path / "delta").exists()
    # A truncated delta shard is caught before anything is written.
    cfg = delta_scheme.DeltaConfig(max_shard_mb=1)
    delta_make.make(cfg, models / "base_bf16", models / "adapted_bf16_single", tmp_path / "delta")
    dshard = sorted((tmp_path / "delta").glob("delta-*.safetensors"))[0]
    dshard.write_bytes(dshard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{dshard.name}: truncated"):
        delta_apply.apply_cptflow(cfg, models / "base_bf16", tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_shard_is_named(models, tmp_path):
    adapted = tmp_path / "adapted"
    shutil.copytree(models / "adapted_bf16_sharded", adapted)
    gone = sorted(adapted.glob("model-*.safetensors"))[0]
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{gone.name}: shard named in model.safetensors.index.json"):
        delta_make.make(delta_scheme.DeltaConfig(), models / "base_bf16", adapted, tmp_path / "delta")
    cfg = delta_scheme.DeltaConfig(max_shard_mb=1)
    delta_make.make(cfg, models / "base_bf16", models / "adapted_bf16_sharded", tmp_path / "delta")
    dgone = sorted((tmp_path / "delta").glob("delta-*.safetensors"))[-1]
    dgone.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{dgone.name}: delta shard .* missing"):
        delta_apply.apply_cptflow(cfg, models / "base_bf16", tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def fastchat_delta(tmp_path: Path, tokenizer, rows: int) -> tuple[Path, Path, dict, dict]:
    """A public-style delta: (target - base) computed in fp16, saved as an HF model directory."""
    base = tiny(3, torch.float16)
    target = adapt(tiny(3, torch.float16), seed=4)
    target.resize_token_embeddings(rows, mean_resizing=False)
    bsd, tsd = base.state_dict(), target.state_dict()
    dsd = {}
    for k, v in tsd.items():
        d = v.clone()
        n = min(d.shape[0], bsd[k].shape[0])
        d[:n] -= bsd[k][:n]
        dsd[k] = d
    save(base, tokenizer, tmp_path / "fc_base")
    target.load_state_dict(dsd)
    save(target, tokenizer, tmp_path / "fc_delta")
    return tmp_path / "fc_base", tmp_path / "fc_delta", bsd, dsd


def test_fastchat_apply_adds_overlap_and_keeps_extra_rows(tmp_path, tokenizer):
    base, dl, bsd, dsd = fastchat_delta(tmp_path, tokenizer, BASE_VOCAB + 64)
    stats, _, _ = delta_apply.apply_fastchat(delta_scheme.DeltaConfig(max_shard_mb=1), base, dl, tmp_path / "out")
    assert stats["rows_from_delta_only"] == 2 * 64
    out = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        out.update(load_file(f))
    assert set(out) == set(dsd)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    for k, d in dsd.items():
        b = bsd[k].float()
        want = d.float()
        want[: b.shape[0]] += b
        assert out[k].dtype == torch.float16
        assert torch.equal(out[k], want.half()), k
    emb = out["model.embed_tokens.weight"]
    assert torch.equal(emb[BASE_VOCAB:], dsd["model.embed_tokens.weight"][BASE_VOCAB:])
    # And it loads as a model.
    m = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert m.get_input_embeddings().weight.shape[0] == BASE_VOCAB + 64


def test_fastchat_delta_with_smaller_vocab_is_refused(tmp_path, tokenizer):
    base, dl, _, _ = fastchat_delta(tmp_path, tokenizer, BASE_VOCAB - 64)
    with pytest.raises(ValueError, match=r"tensor (lm_head|model.embed_tokens).weight: the delta has 32704 rows"):
        delta_apply.apply_fastchat(delta_scheme.DeltaConfig(), base, dl, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_make_apply_and_errors(models, tmp_path, capsys):
    base, adapted = models / "base_bf16", models / "adapted_bf16_sharded"
    rc = delta_make.main(["--base", str(base), "--adapted", str(adapted), "--output-dir", str(tmp_path / "d"),
                     "--stats", str(tmp_path / "make.json"), "--params", json.dumps({"max_shard_mb": 2})])
    assert rc == 0
    man = read_json(tmp_path / "make.json")
    assert man["stage"] == "delta_make" and man["params"]["max_shard_mb"] == 2
    assert man["inputs"][str(adapted)] == sha256_path(adapted)  # digest without a second read agrees
    assert man["outputs"][str(tmp_path / "d")] == sha256_path(tmp_path / "d")
    rc = delta_apply.main(["--base", str(base), "--delta", str(tmp_path / "d"), "--output-dir",
                     str(tmp_path / "out"), "--log", str(tmp_path / "apply.log")])
    assert rc == 0
    same_dirs(adapted, tmp_path / "out")
    assert read_json(tmp_path / "out.stats.json")["counts"]["format/cptflow"] == 1
    rc = delta_apply.main(["--base", str(models / "base_fp32"), "--delta", str(tmp_path / "d"),
                     "--output-dir", str(tmp_path / "out2")])
    assert rc == 2 and "wrong base model" in capsys.readouterr().err
    assert delta_make.main(["--params", '{"max_shard_mb": 0}', "--base", "x", "--adapted", "y",
                       "--output-dir", str(tmp_path / "z")]) == 2


