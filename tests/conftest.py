"""Test set-up: the Triton interpreter where there is no GPU, and the `gpu` marker."""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # triton reads TRITON_INTERPRET when a kernel is decorated, so this must precede every kernel import.
    assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", "triton imported before conftest"
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
