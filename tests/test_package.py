"""Packaging: the namespace layout, the import boundary for drop-in users and the `train` extra's check, the console
script and the version, the backend switch. The built wheel installed outside the checkout: tests/test_wheel.py."""
import inspect
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from dinotron.kernels.backend import resolve_backend

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_kernels_import_pulls_no_data_or_model_libraries():
    out = run_python(
        "import sys, dinotron.kernels\n"
        "heavy = [m for m in ('nvidia.dali', 'timm', 'webdataset') if m in sys.modules]\n"
        "print(heavy)"
    )
    assert out.strip() == "[]"


def test_dinotron_is_a_namespace_of_four_packages():
    out = run_python(
        "import dinotron, dinotron.configs, dinotron.kernels, dinotron.pipeline, dinotron.train\n"
        "print(getattr(dinotron, '__file__', None))\n"
        "print(*(m.__name__ for m in (dinotron.configs, dinotron.kernels, dinotron.pipeline, dinotron.train)))"
    )
    first, second = out.strip().splitlines()
    assert first == "None"
    assert second == "dinotron.configs dinotron.kernels dinotron.pipeline dinotron.train"


@pytest.mark.parametrize("package", ["dinotron.pipeline", "dinotron.train", "dinotron.train.cli"])
@pytest.mark.parametrize("absent", [("timm",), ("PIL", "yaml")])  # in the order the check lists them
def test_train_packages_without_the_extra_name_the_install_command(package, absent):
    """A `train` dependency missing (a None entry in sys.modules makes find_spec and import miss it): one line."""
    hide = "".join(f"sys.modules[{m!r}] = None; " for m in absent)
    proc = subprocess.run([sys.executable, "-c", f"import sys; {hide}import {package}"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (f"ImportError: dinotron.train and dinotron.pipeline need the `train` extra "
                                            f"({', '.join(absent)} not installed): pip install 'dinotron[train]'")


# Every name dinotron.kernels exports, with the module that defines it and what it is.
PUBLIC = {
    "DINOLoss": ("cross_entropy", "module"),
    "FusedHeadDINOLoss": ("fused_head", "module"),
    "FusedHeadIBOTLoss": ("fused_head", "module"),
    "GramLoss": ("gram", "module"),
    "IBOTPatchLoss": ("cross_entropy", "module"),
    "KoLeoLoss": ("koleo", "module"),
    "attention": ("flash_attention", "function"),
    "attention_varlen": ("flash_attention", "function"),
    "dino_loss": ("cross_entropy", "function"),
    "fused_head_dino_loss": ("fused_head", "function"),
    "fused_head_ibot_loss": ("fused_head", "function"),
    "gram_loss": ("gram", "function"),
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


def test_console_script_version_is_pyprojects_and_the_changelogs():
    """The version is written once, in pyproject.toml; `dinotron --version` reads it from the installed metadata and
    CHANGELOG.md has a section for it."""
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert metadata.version("dinotron") == version, "reinstall: pip install -e '.[test,demo]'"
    exe = Path(sys.executable).with_name("dinotron")
    out = subprocess.run([str(exe), "--version"], check=True, capture_output=True, text=True).stdout
    assert out == f"dinotron {version}\n"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), "no section"


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
