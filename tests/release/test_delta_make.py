"""delta_make: a delta against the wrong base fails naming the tensor; the stage config rejects bad values.

The round trip (make then apply, bit for bit) is in test_delta_apply.py.
"""

from __future__ import annotations

import pytest
import torch

from cptflow.release import delta_make, delta_scheme
from support.release import save, tiny


def test_wrong_base_shape_names_the_tensor(models, tmp_path, tokenizer):
    other = save(tiny(0, torch.bfloat16, hidden=64), tokenizer, tmp_path / "other")
    with pytest.raises(ValueError, match=r"tensor (lm_head|model\.)\S*weight: shape .*wrong base"):
        delta_make.make(delta_scheme.DeltaConfig(), other, models / "adapted_bf16_single", tmp_path / "delta")
    assert not (tmp_path / "delta").exists()


def test_config_rejects_unknown_and_bad_values():
    from cptflow.core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(delta_scheme.DeltaConfig, {"max_shard": 3}, "delta")
    with pytest.raises(ConfigError, match="fastchat_dtype"):
        delta_scheme.DeltaConfig(fastchat_dtype="int8")


def test_a_stage_model_changed_after_training_is_refused_before_the_delta(models, tmp_path):
    """delta_make checks the adapted model against the manifest beside it (a training stage writes
    train/<stage>/model/ with train/<stage>/train.stats.json): a weight file changed in place, same
    size, stops the stage naming the model, and no delta is written."""
    import shutil

    from cptflow.core.stats import Stats, write_manifest

    stage = tmp_path / "train" / "full"
    adapted = stage / "model"
    shutil.copytree(models / "adapted_bf16_single", adapted)
    write_manifest(stage / "train.stats.json", stage="train/full", version=1, params={}, inputs=[], stats=Stats(),
                   seconds=0, outputs=[adapted])
    args = ["--base", str(models / "base_bf16"), "--adapted", str(adapted), "--log", str(tmp_path / "delta.log")]
    assert delta_make.main([*args, "--output-dir", str(tmp_path / "ok")]) == 0  # intact: checked and made
    weights = adapted / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert delta_make.main([*args, "--output-dir", str(tmp_path / "delta")]) != 0
    log = (tmp_path / "delta.log").read_text(encoding="utf-8")
    assert f"{adapted}: differs from what train/full wrote" in log and "train.stats.json" in log
    assert not (tmp_path / "delta").exists()
