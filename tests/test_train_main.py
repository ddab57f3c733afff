"""The README's main job, run as a user runs it (a subprocess on its own emulated topology)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_main_job_prints_finite_loss():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", "--steps=2", "--config.seq_len=128"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on topology cm384-8 (8 devices)" in result.stdout
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", result.stdout)]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses), result.stdout
