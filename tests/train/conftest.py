"""Fixtures of the training tests: the tiny LLaMAs and packed data (per test module), one torch thread."""

import pytest
import torch

from support.training import make_data, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """test_train's tiny LLaMA (untied and tied) and its 24 packed samples, in a folder named for the module."""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    return {"root": root, "data": make_data(root / "data"), "model": make_model(root / "model"),
            "tied": make_model(root / "tied", tied=True)}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # same kernels as the OMP_NUM_THREADS=1 subprocesses
    yield
    torch.set_num_threads(n)
