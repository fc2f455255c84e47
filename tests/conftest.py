"""Test set-up: compiled kernels for `pytest -m gpu` on a CUDA machine, the Triton interpreter otherwise.

The non-gpu tests run every kernel in the interpreter on CPU tensors, on any machine; the tests
marked `gpu` run the compiled kernels on CUDA tensors and are selected with `-m gpu`.
"""
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def _compiled_run(config) -> bool:
    return HAS_CUDA and _selected(config, "gpu")


def pytest_configure(config):
    # triton reads TRITON_INTERPRET when a kernel is decorated, so this must precede every kernel import.
    if not _compiled_run(config):
        assert "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1", (
            "triton imported before conftest"
        )
        os.environ["TRITON_INTERPRET"] = "1"


def _selected(config, marker: str) -> bool:
    markexpr = config.getoption("markexpr", "") or ""
    return marker in markexpr and f"not {marker}" not in markexpr


# Tiers of minutes each, run only when selected (CI runs both after `make test`): marker -> why it is skipped.
OPT_IN = {"static": "the sm_90 static report: run `pytest -m static` (make test-static)",
          "demo": "trains the demo model for minutes: run `pytest -m demo` (make test-demo)"}


def _skip_marked(items, marker: str, reason: str) -> None:
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker(marker):
            item.add_marker(skip)


def pytest_collection_modifyitems(config, items):
    for marker, reason in OPT_IN.items():
        if not _selected(config, marker):
            _skip_marked(items, marker, reason)
    if not _compiled_run(config):
        _skip_marked(items, "gpu", "compiled kernels: run `pytest -m gpu`" if HAS_CUDA
                     else "needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_dynamo():
    """Compiled code and guards of other tests neither help nor hide a graph break in the test that uses it."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
