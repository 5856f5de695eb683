"""`make gpu-check DRY=1`: the GPU check's every step on the CPU, so the script a lent GPU machine runs cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_every_step_on_the_cpu_and_reports_them(tmp_path):
    report = tmp_path / "gpu-report.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--report", str(report),
                           "--work", str(tmp_path / "work"), "--budget", "1200"], capture_output=True, text=True)
    text = report.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "steps: 13, failed or not run: 0" in text, text[:2000]
    for title in ("cuda tests: ok", "mlp: train on cpu: ok", "mlp: fuse-bn --verify --device cpu: ok", "resnet18: import: ok",
                  "resnet18: verify --devices cpu: ok", "resnet18: bench --device cpu: ok"):
        assert f"## {title}" in text, title
    assert "| onnxruntime | cpu | pass | float32 |" in text  # verify's rows, with the precision they ran in
    assert ("| openvino-bf16 | cpu | 1 | bf16 |" in text or "openvino absent" in text  # bench's rows, with theirs;
            or "| openvino-bf16 | cpu | - | - | skipped | this CPU cannot compute in bf16" in text)  # AVX2 without bf16
