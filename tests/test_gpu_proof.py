"""The GPU proof's smoke run (benchmarks/gpu_proof.py --smoke): every part on CPU at tiny shapes, so that a broken
import, a wrong argument or a missing results folder shows here long before a GPU is lent.

Oracles: the files the run must write (proof.json, one JSON per benchmark, summary.md: at most 8), each row
labelled with the device it ran on, every part's status; and bench_step's per-part split, whose parts are
checked against the trainer's profiler scopes (a backward counted to its forward's scope).
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ("losses", "koleo", "attention", "fused_head", "step", "loader_stall")


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_proof.py", "--out", str(out), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return out, proc


def test_every_part_runs(proof):
    out, proc = proof
    record = json.loads((out / "proof.json").read_text())
    statuses = {p["part"]: p["status"] for p in record["parts"]}
    assert proc.returncode == 0, (statuses, proc.stdout[-3000:])
    assert list(statuses) == ["tests", *BENCHES]
    assert all(s.startswith("ok") for s in statuses.values()), statuses
    assert record["bandwidth"]["gbps"] > 0
    expected = ["proof.json", "summary.md", *(f"{b}.json" for b in BENCHES)]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert len(list(out.iterdir())) <= 8


def test_rows_name_their_device(proof):
    out, proc = proof
    device = json.loads((out / "proof.json").read_text())["device"]
    for bench in BENCHES:
        record = json.loads((out / f"{bench}.json").read_text())
        assert record["device"] == device and record["rows"], bench
        assert all(r.get("ms") is not None or r.get("note") for r in record["rows"]), bench
    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the summary is printed last
    table = [line for line in summary.splitlines() if line.startswith("| ") and " ms " not in line]
    assert any(device in line for line in table)


def test_step_split_follows_the_trainer_scopes(proof):
    out, _ = proof
    rows = json.loads((out / "step.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["eager_sdpa", "dinotron"]
    for r in rows:
        split = r["split_ms"]
        assert {"teacher", "backbone", "backbone_bwd", "heads", "heads_bwd", "losses", "losses_bwd", "optimizer",
                "ema"} <= set(split), split
        # the parts are the profiled step's CPU time: most of it sits in the scopes, little in "other"
        assert split.get("other", 0.0) < 0.2 * sum(split.values()), split
