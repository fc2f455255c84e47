"""Packaging: the namespace layout, the import boundary for drop-in users, the console script, the backend switch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinotron.kernels.backend import resolve_backend


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_kernels_import_pulls_no_data_or_model_libraries():
    out = run_python(
        "import sys, dinotron.kernels\n"
        "heavy = [m for m in ('nvidia.dali', 'timm', 'webdataset') if m in sys.modules]\n"
        "print(heavy)"
    )
    assert out.strip() == "[]"


def test_dinotron_is_a_namespace_of_three_packages():
    out = run_python(
        "import dinotron, dinotron.kernels, dinotron.pipeline, dinotron.train\n"
        "print(getattr(dinotron, '__file__', None))\n"
        "print(dinotron.kernels.__name__, dinotron.pipeline.__name__, dinotron.train.__name__)"
    )
    first, second = out.strip().splitlines()
    assert first == "None"
    assert second == "dinotron.kernels dinotron.pipeline dinotron.train"


def test_public_names():
    import dinotron.kernels as k

    for name in ("softmax_center_teacher", "sinkhorn_knopp_teacher", "update_center", "dino_loss",
                 "ibot_patch_loss", "koleo_loss", "attention"):
        assert callable(getattr(k, name)), name


def test_console_script_version():
    exe = Path(sys.executable).with_name("dinotron")
    out = subprocess.run([str(exe), "--version"], check=True, capture_output=True, text=True).stdout
    assert out.startswith("dinotron ")


def test_resolve_backend(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("DINOTRON_BACKEND", raising=False)
    assert resolve_backend(None, cpu) == "eager"
    assert resolve_backend("auto", cpu) == "eager"
    assert resolve_backend("eager", cpu) == "eager"
    monkeypatch.setenv("DINOTRON_BACKEND", "eager")
    assert resolve_backend(None, cpu) == "eager"
    assert resolve_backend("auto", cpu) == "eager", "an explicit argument wins over the environment"
    monkeypatch.setenv("DINOTRON_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        resolve_backend(None, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
