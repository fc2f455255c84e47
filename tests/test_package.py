"""Packaging: the namespace layout, the import boundary for drop-in users, the console script, the backend switch."""
import inspect
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


# Every name dinotron.kernels exports, with the module that defines it and what it is.
PUBLIC = {
    "DINOLoss": ("cross_entropy", "module"),
    "IBOTPatchLoss": ("cross_entropy", "module"),
    "KoLeoLoss": ("koleo", "module"),
    "attention": ("flash_attention", "function"),
    "attention_varlen": ("flash_attention", "function"),
    "dino_loss": ("cross_entropy", "function"),
    "ibot_patch_loss": ("cross_entropy", "function"),
    "koleo_loss": ("koleo", "function"),
    "make_cu_seqlens": ("flash_attention", "function"),
    "packed_sequences": ("flash_attention", "function"),
    "resolve_backend": ("backend", "function"),
    "sinkhorn_knopp_teacher": ("sinkhorn_knopp", "function"),
    "softmax_center_and_update_teacher": ("softmax_center", "function"),
    "softmax_center_teacher": ("softmax_center", "function"),
    "swap_timm_attention": ("flash_attention", "function"),
    "update_center": ("softmax_center", "function"),
}


def test_public_names_are_exactly_the_table():
    import dinotron.kernels as k

    assert sorted(k.__all__) == sorted(PUBLIC), "a name was added to or dropped from dinotron.kernels.__all__"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_name_is_its_modules_object(name):
    import importlib

    import dinotron.kernels as k

    module, kind = PUBLIC[name]
    obj = getattr(k, name)
    assert obj is getattr(importlib.import_module(f"dinotron.kernels.{module}"), name)
    if kind == "module":
        assert isinstance(obj, type) and issubclass(obj, torch.nn.Module)
    else:
        assert inspect.isfunction(obj) and obj.__module__ == f"dinotron.kernels.{module}"


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
