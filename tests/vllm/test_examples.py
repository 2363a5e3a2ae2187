"""examples/vllm_offline.py runs as a user runs it, at a tiny size: three requests in one
batch, the steered ones differing from the plain one."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vllm_offline.py"


def test_vllm_offline(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--texts", "64", "--max-tokens", "12",
         "--gpu-memory-utilization", "0.1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    replies = dict(re.findall(r"^ *(plain|football λ 1|football 1 then calm 0.5): (.*)$",
                              done.stdout, flags=re.M))  # fmt: skip
    assert len(replies) == 3, done.stdout
    assert replies["plain"] != replies["football λ 1"]
    assert replies["football λ 1"] != replies["football 1 then calm 0.5"]
