"""The benchmark plumbing writes results in the agreed format; benchmarks/README.md tables stay in sync with them."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def test_device_slug():
    assert common.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert common.device_slug("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz") == "xeon-platinum-8481c-2-70ghz"


def test_save_writes_the_results_format(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "benchmarks" / "results")
    rows = [
        {"case": "B=4", "impl": "dinotron", "ms": 1.0},
        {"case": "B=4", "impl": "eager", "ms": 3.0, "peak_mib": None},
    ]
    common.add_speedups(rows, ours="dinotron")
    assert rows[0]["speedup_vs"] == {"eager": 3.0}
    path = common.save("demo", rows, device="cpu")
    record = json.loads(path.read_text())
    assert path.parent.name == common.device_slug(common.device_name("cpu"))
    for key in ("bench", "device", "torch", "triton", "dali", "date", "command", "rows"):
        assert key in record, key
    assert record["rows"] == rows


def test_readme_tables_are_generated_from_results():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
