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


def test_roofline_share_on_cuda_rows_only():
    import roofline

    cost = roofline.Cost(bytes=3e9, flops=7e11)  # 1 ms of bytes at 3.0 TB/s, 1 ms of flops at 700 TFLOP/s
    cpu_row, cuda_row = {"case": "c", "impl": "i", "ms": 2.0}, {"case": "c", "impl": "i", "ms": 2.0}
    common.add_roofline(cpu_row, cost, "cpu")
    common.add_roofline(cuda_row, cost, "cuda")  # a device type: no GPU needed
    assert "roofline_share" not in cpu_row
    assert cuda_row["roofline_ms"] == 1.0 and cuda_row["roofline_share"] == 0.5


def test_roofline_formulas():
    import roofline

    S, T, B, K = 10, 2, 128, 65536
    # the DINO step reads S + T views of (B, K) bf16 logits and writes the (S, B, K) gradient
    assert roofline.dino_loss(S, T, B, K, 2, None).bytes == (S + T + S) * B * K * 2
    # attention forward: 4 N^2 D flops per head and sequence (flash-attn's count)
    assert roofline.attention([(2, 257)], 6, 64, 2, backward=False).flops == 2 * 6 * 4 * 257 ** 2 * 64
    assert roofline.koleo(4096, 384, 4).flops > 2 * 4096 ** 2 * 384
