"""The built wheel installed outside the checkout: the drop-in kernels with the base dependencies only, then
`dinotron train --preset demo` with the `train` extra.

The wheel is built from a copy of the files pyproject.toml names (no build isolation: setuptools comes from this
environment) and installed by pip, without an index, into a fresh venv. pip must find every dependency the wheel
declares there; they are this environment's installed copies of exactly the distributions pip would install for the
wheel's requirements (markers evaluated, followed recursively through each distribution's own requirements), linked
from their RECORD, so the venv holds what a `pip install` would bring and nothing else, in seconds rather than the
minutes of unpacking torch's and DALI's wheels (pip took 108 s for torch alone on the 2-core machine).

Oracles: plain torch formulas for the three ops (lightly's DINOLoss at epoch 0, dinov2's KoLeoLoss, softmax
attention) at torch's float32 assert_close tolerances (both sides compute in float32 in another order); the wheel's
own metadata for what the base venv may hold; the trainer's metrics.jsonl for the three steps.
"""
import collections
import email.parser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with Python 3.11's tomllib")
ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(argv, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def requirements(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode()).get_all("Requires-Dist") or []


def installed_closure(reqs: list[str], extras: set[str]) -> dict[str, metadata.Distribution]:
    """{name: distribution} of this environment for `reqs` under `extras` and, recursively, for each one's own
    requirements (with the extras it is asked for): what pip would install, as the versions installed here."""
    found, seen = {}, set()
    todo = [(r, extras) for r in reqs]
    while todo:
        text, active = todo.pop()
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in {"", *active}):
            continue
        name = canonicalize_name(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        dist = metadata.distribution(req.name)  # PackageNotFoundError: this environment lacks a dependency
        assert req.specifier.contains(dist.version, prereleases=True), f"{text}: {dist.version} installed here"
        found[name] = dist
        todo += [(r, set(req.extras)) for r in dist.requires or []]
    return found


def link_distributions(dists, site: Path) -> None:
    """Symlinks each distribution's files (its RECORD) into `site`: a top-level entry that no other distribution
    installed here has files in as one link, those of a shared folder (nvidia/, a namespace) one by one. Scripts,
    which lie outside site-packages, are left out."""
    owners = collections.Counter(top for d in metadata.distributions() for top in {f.parts[0] for f in d.files or []})
    for dist in dists:
        for f in dist.files:
            link = Path(f.parts[0]) if owners[f.parts[0]] == 1 else Path(f)
            if f.parts[0] == ".." or (site / link).is_symlink():
                continue
            (site / link).parent.mkdir(parents=True, exist_ok=True)
            (site / link).symlink_to(dist.locate_file(link))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """dinotron's wheel, built from a copy of pyproject.toml, README.md and the folders its package-dir names."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for name in ("pyproject.toml", project["project"]["readme"]):
        shutil.copy(ROOT / name, src / name)
    for folder in project["tool"]["setuptools"]["package-dir"].values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", out,
         src], cwd=out)
    (whl,) = out.glob("dinotron-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel and its base dependencies only."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=venv)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=venv).stdout.strip())
    link_distributions(installed_closure(requirements(wheel), set()).values(), site)
    pip_install(venv, wheel)
    return venv


def pip_install(venv: Path, spec) -> None:
    """pip installs `spec` into `venv` without an index: every dependency must already be there."""
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-index", spec],
        cwd=venv)


def test_wheel_holds_the_packages_and_presets(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    tops = {n.split("/")[1] for n in names if n.startswith("dinotron/")}
    assert tops == {"kernels", "pipeline", "train", "configs"}
    shipped = {Path(n).name for n in names if n.startswith("dinotron/configs/") and n.endswith(".yaml")}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")}


KERNELS_CHECK = """
import importlib.util, sys

import torch
import torch.nn.functional as F

import dinotron.kernels as k

assert k.__file__.startswith(sys.prefix), k.__file__  # the venv's copy, not the checkout's
absent = [m for m in ("nvidia.dali", "timm", "webdataset", "PIL", "yaml") if importlib.util.find_spec(m) is not None]
assert absent == [], f"installed with the base dependencies: {absent}"
torch.manual_seed(0)

# DINOLoss at epoch 0: lightly's loss with the warmup teacher temperature and a zero centre
t, s = torch.randn(2, 4, 32), torch.randn(4, 4, 32)
got = k.DINOLoss(output_dim=32, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)(
    list(t), list(s), epoch=0)
targets, log_p = F.softmax(t / 0.04, dim=-1), F.log_softmax(s / 0.1, dim=-1)
want = torch.stack([-(targets[i] * log_p[j]).sum(-1).mean() for i in range(2) for j in range(4) if i != j]).mean()
torch.testing.assert_close(got, want)

# KoLeoLoss: dinov2's -log of each row's distance to its nearest neighbour on the sphere
x = torch.randn(16, 8)
xn = F.normalize(x, eps=1e-8)
dots = (xn @ xn.T).fill_diagonal_(-1)
want = -torch.log(F.pairwise_distance(xn, xn[dots.argmax(1)], eps=1e-8) + 1e-8).mean()
torch.testing.assert_close(k.KoLeoLoss()(x), want)

# attention: softmax(q k^T / sqrt(D)) v
q, kk, v = torch.randn(3, 2, 2, 10, 16).unbind(0)
assert k.resolve_backend("auto", q) == "eager"  # the CPU path of all three ops
torch.testing.assert_close(k.attention(q, kk, v), F.scaled_dot_product_attention(q, kk, v))
"""


def test_base_install_runs_the_kernels_and_names_the_train_extra(venv, tmp_path):
    python = venv / "bin" / "python"
    run([python, "-c", KERNELS_CHECK], cwd=tmp_path)
    for argv in ([python, "-c", "import dinotron.pipeline"], [python, "-c", "import dinotron.train"],
                 [venv / "bin" / "dinotron", "--version"]):  # the command is dinotron.train.cli's
        proc = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True)
        assert proc.returncode == 1
        assert proc.stderr.splitlines()[-1].startswith("ImportError: dinotron.train and dinotron.pipeline need the "
                                                       "`train` extra"), proc.stderr
        assert proc.stderr.splitlines()[-1].endswith(": pip install 'dinotron[train]'"), proc.stderr


def test_train_extra_runs_the_demo_preset_from_outside_the_checkout(venv, wheel, tmp_path):
    venv_site = next((venv / "lib").glob("python*/site-packages"))
    link_distributions(installed_closure(requirements(wheel), {"train"}).values(), venv_site)
    pip_install(venv, f"dinotron[train] @ {wheel.as_uri()}")
    dinotron = venv / "bin" / "dinotron"
    version = wheel.name.split("-")[1]  # dinotron-<version>-py3-none-any.whl
    assert run([dinotron, "--version"], cwd=tmp_path).stdout == f"dinotron {version}\n"

    rng = np.random.default_rng(0)
    for i in range(8):  # two classes of 4 noise images: 2 batches of 4 an epoch
        (tmp_path / "images" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "images" / f"c{i % 2}" /
                                                                                 f"{i}.jpg")
    run([dinotron, "make-shards", "images", "shards", "--workers", "1"], cwd=tmp_path)
    proc = run([dinotron, "train", "--preset", "demo", "data.train_shards=[shards/train-000000.tar]",
                "data.batch_size_per_gpu=4", "train.max_steps=3", "train.output_dir=run", "train.progress=false"],
               cwd=tmp_path)
    assert "train loader: dali-cpu" in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["step"] == 3
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
