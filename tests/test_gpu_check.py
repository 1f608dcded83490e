"""benchmarks/gpu_check.py where no GPU answers (CUDA_VISIBLE_DEVICES empty hides any): a clear refusal."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_refuses_without_a_gpu_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, r.stderr
    assert "gpu_check: refused, nothing measured or written:" in r.stderr
    assert "the CUDA driver reports 0 devices" in r.stderr or "has no CUDA provider" in r.stderr
    assert not out.exists()
