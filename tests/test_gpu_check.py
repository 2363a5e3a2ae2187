"""benchmarks/gpu_check.py (issue 27 §6) runs at its CPU size, so the script a GPU session runs
in one call cannot rot: every check passes on a tiny float32 model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_passes_at_cpu_size():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--dtype", "float32", "--shapes",
         "tiny", "--texts", "64", "--rounds", "1", "--new-tokens", "4"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    checked = [line.split("]")[1].split(":")[0].strip() for line in lines if "[ok]" in line]
    assert checked == ["capture and fit", "λ = 0", "fold", "per-row λ", "gate", "LinEAS",
                       "generate batch 1", "generate batch 32", "compiled steered",
                       "compiled generate batch 1", "compiled generate batch 32"]  # fmt: skip
