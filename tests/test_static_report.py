"""Every Triton kernel, compiled for sm_90 as the JIT specialises it at the benchmark shapes, meets the budgets.

benchmarks/static_report.py runs in a fresh process without TRITON_INTERPRET (as tests/lowering.py does): it
calls each public op on CPU tensors with backend="triton", intercepts the launches, compiles every
specialisation (every config an autotuner could pick included) with Triton's compiler and ptxas, and reads
the cubin and PTX. The thresholds are static_report.check's: no spill (ptxas's local memory and the SASS's
STL/LDL), at most 227 KiB of shared memory per CTA (sm_90's limit for one CTA), no scalar global load in the
loops of the loss kernels, whose rows are contiguous, and at least one CTA per SM (132) for a launch over
>= 128 rows. The list of kernels is found here, from the source of kernels/*.py (an oracle outside the
report): every @triton.jit function that no other one calls must appear in the report.

A cold run compiles 230-260 specialisations (most of them the attention autotuner's configs): 20-35 minutes
on the shared two-core machine; Triton's cache (~/.triton/cache) makes later runs take about 2 minutes,
recompiling only the kernels that changed. So the two report tests are marked `static`: `make test-static`
(`pytest -m static`) runs them, and CI (.ci/run) after `make test`.
"""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def jit_kernels(folder: Path) -> set[tuple[str, str]]:
    """(module, name) of the launchable @triton.jit functions in folder/*.py: those no @triton.jit function
    calls (the others are inlined helpers)."""
    defined, called = {}, set()
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                defined[node.name] = path.stem
                called |= {c.func.id if isinstance(c.func, ast.Name) else c.func.attr
                           for c in ast.walk(node) if isinstance(c, ast.Call)
                           and isinstance(c.func, (ast.Name, ast.Attribute))}
    return {(module, name) for name, module in defined.items() if name not in called}


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("static") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--out", str(out),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.static
def test_kernels_fit_sm90(record):
    import static_report

    failures = static_report.check(record)
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


@pytest.mark.static
def test_every_kernel_is_in_the_report(record):
    import dinotron.kernels

    kernels = jit_kernels(Path(dinotron.kernels.__file__).parent)
    assert kernels, "the scan found no kernel"
    reported = {(r["module"], r["kernel"]) for r in record["kernels"]}
    assert not kernels - reported, f"kernels no op of the report launches: {sorted(kernels - reported)}"


def test_jit_kernel_scan_skips_helpers(tmp_path):
    (tmp_path / "k.py").write_text(
        "import triton\n\n@triton.jit\ndef helper(x):\n    return x\n\n"
        "@triton.autotune(configs=[], key=[])\n@triton.jit\ndef kernel(X):\n    helper(X)\n"
    )
    assert jit_kernels(tmp_path) == {("k", "kernel")}
