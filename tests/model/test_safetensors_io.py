"""The streaming safetensors reader/writer that release and intake build on."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from cptflow.model import safetensors_io


def test_safetensors_writer_is_readable(tmp_path):
    """Our streamed writer produces files that the safetensors library itself reads back."""
    ts = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int16)}
    safetensors_io.write_st(tmp_path / "x.safetensors", [(k, safetensors_io.ST_NAMES[v.dtype], tuple(v.shape), v.numel() *
                                                   v.element_size()) for k, v in ts.items()], {"k": "v"}, ts.get)
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    save_file(ts, tmp_path / "y.safetensors")
    assert [t.name for t in safetensors_io.read_header(tmp_path / "y.safetensors").tensors] == ["b", "a"]
