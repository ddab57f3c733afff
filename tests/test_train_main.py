"""The README's main job, run as a user runs it (a subprocess on its own emulated topology): it trains,
writes checkpoints and metrics, and a second run with the same workdir resumes where it stopped."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config.eval.num_examples=8", "--config.eval.batch_rows=8", "--config.checkpoint.log_every=1"]


def _train(workdir, steps):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/tiny.py", f"--workdir={workdir}", f"--steps={steps}",
         *QUICK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_main_job_trains_checkpoints_and_resumes(tmp_path):
    first = _train(tmp_path, 3)
    assert "on topology cm384-8 (8 devices)" in first
    assert re.search(r"held-out exact match before training: [0-9.]+ \(\d+/8\)", first)
    losses = [float(x) for x in re.findall(r"step \d+: loss ([0-9.]+)", first)]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses), first
    assert (tmp_path / "checkpoints" / "3").is_dir()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]

    second = _train(tmp_path, 5)
    assert "resumed from step 3" in second
    assert "held-out exact match before" not in second
    assert [int(s) for s in re.findall(r"step (\d+): loss", second)] == [4, 5]
    assert (tmp_path / "checkpoints" / "5").is_dir()
