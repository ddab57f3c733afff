"""Training metrics: `metrics.jsonl`, TensorBoard events and a progress line per logging interval.

The loop hands the step's device scalars to `MetricsWriter.write` only every `log_every` steps (fetching
them waits for the step) and prints `progress_line` of the record it returns. Throughput is measured
between two writes, or from a `mark` (which restarts the clock after an evaluation, or before the first
write of a step compiled ahead); the first write after the writer is made has none, since its interval
holds the step's compilation. MFU uses the analytic training FLOPs per token and the topology's
peak. The step's per-expert load ([layers + MTP, experts] counts) goes to `expert_load.jsonl`, one
line per interval, for trainer/pictures.py; `metrics.jsonl` stays scalar. Invariants: a NaN/Inf is
recorded like any other value (strict JSON); a run resumed from step k drops the records after k in
both files, so each holds one record per step. Details: docs/training.md.
"""

import datetime
import json
import math
import time

import jax
import numpy as np
from etils import epath
from tensorboard.summary import Writer

from trainer.nonfinite import NONFINITE_STEPS

METRICS_FILE = "metrics.jsonl"
EXPERT_LOAD_FILE = "expert_load.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Names of the step's metrics (trainer.step.make_train_step) that the progress line shows.
LOSS, LEARNING_RATE, GRAD_NORM = "loss", "learning_rate", "grad_norm"
IMBALANCE, DROPS = "expert_load_max_over_mean", "dropped_assignments"
EXPERT_LOAD = "expert_load"  # the step's [layers + MTP, experts] token-expert assignment counts
# Values the writer derives from the clock.
TOKENS_PER_SECOND, MFU, ETA_SECONDS = "tokens_per_second", "mfu", "eta_seconds"


def _json_value(value: float):
    """Floats as JSON accepts them: NaN/Inf become strings instead of the non-standard NaN token."""
    return value if math.isfinite(value) else str(value)


def _drop_records_after(path: epath.Path, step: int) -> None:
    """Keeps the complete records of steps <= `step` in the JSONL file at `path` (if any), replacing the
    file in one rename so a crash leaves the old or the new one. A last line without its newline was
    cut by a killed process and goes too."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        rewritten = path.parent / (path.name + ".rewrite")
        rewritten.write_text("".join(kept))
        rewritten.replace(path)


def progress_line(record: dict, refused: bool = False) -> str:
    """The progress line of a record of `MetricsWriter.write`: step, loss, lr, grad_norm, tokens/s, MFU,
    expert load, drops, ETA (those the record has; NaN/Inf arrive as strings); `refused`: the step's
    update was not applied (trainer.nonfinite)."""
    parts = [f"step {record['step']}: loss {float(record[LOSS]):.4f}"]
    formats = [
        (LEARNING_RATE, "lr {:.3e}"),
        (GRAD_NORM, "grad_norm {:.4g}"),
        (TOKENS_PER_SECOND, "{:,.0f} tok/s"),
        (MFU, "MFU {:.2%}"),
        (IMBALANCE, "load max/mean {:.3f}"),
        (DROPS, "drops {:.0f}"),
    ]
    parts += [fmt.format(float(record[name])) for name, fmt in formats if name in record]
    if record.get(NONFINITE_STEPS):
        parts.append(f"non-finite steps skipped {record[NONFINITE_STEPS]:.0f}")
    if ETA_SECONDS in record:
        parts.append(f"ETA {datetime.timedelta(seconds=round(record[ETA_SECONDS]))}")
    return " | ".join(parts) + (" (non-finite: update not applied)" if refused else "")


class MetricsWriter:
    """Writes each logging interval's metrics to `<workdir>/metrics.jsonl` and
    `<workdir>/tensorboard/` (event files that `tensorboard --logdir <workdir>` finds), and the
    step's expert load, when it has one, to `<workdir>/expert_load.jsonl`.

    tokens_per_step: tokens the model processes per step (global batch x sequence length).
    flops_per_token: model training FLOPs per token; peak_flops: FLOP/s of all devices together.
    start_step: the step the run starts from (0, or the restored checkpoint's); later records of an
    earlier run in the same workdir are dropped. `clock` is injectable so tests can control the
    measured throughput. `output=False` (every process but 0 of a multi-process run) computes the
    records, which the loop's decisions read, and writes nothing.
    """

    def __init__(
        self,
        workdir,
        *,
        total_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float,
        start_step: int = 0,
        clock=time.perf_counter,
        output: bool = True,
    ):
        workdir = epath.Path(workdir)
        self.jsonl_path = workdir / METRICS_FILE
        self.expert_load_path = workdir / EXPERT_LOAD_FILE
        self.tensorboard_dir = workdir / TENSORBOARD_DIR
        self.output = output
        if output:
            workdir.mkdir(parents=True, exist_ok=True)
            _drop_records_after(self.jsonl_path, start_step)
            _drop_records_after(self.expert_load_path, start_step)
            self._jsonl = self.jsonl_path.open("a")
            self._expert_load = self.expert_load_path.open("a")
            self._tensorboard = Writer(str(self.tensorboard_dir))
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._clock = clock
        self._mark_step = self._mark_time = None  # no throughput until a write or a mark starts the clock

    def mark(self, step: int) -> None:
        """Restart the throughput clock: the next write measures from `step`, now."""
        self._mark_step, self._mark_time = step, self._clock()

    def write(self, step: int, metrics: dict) -> dict:
        """Records the scalar entries of `metrics` for `step`, with tokens/s, MFU and ETA; -> the record.

        NaN and Inf are recorded like any other value (see `trainer.nonfinite`).
        """
        host = jax.device_get(metrics)
        # After the fetch, which waits for the step: the clock then reads when `step` finished, not
        # when it was dispatched (steps run asynchronously).
        now = self._clock()
        values = {name: float(np.asarray(value)) for name, value in host.items() if np.ndim(value) == 0}
        if self._mark_step is not None and step > self._mark_step and now > self._mark_time:
            steps, seconds = step - self._mark_step, now - self._mark_time
            tokens_per_second = steps * self.tokens_per_step / seconds
            values[TOKENS_PER_SECOND] = tokens_per_second
            values[MFU] = tokens_per_second * self.flops_per_token / self.peak_flops
            values[ETA_SECONDS] = max(self.total_steps - step, 0) * seconds / steps
        self.mark(step)
        record = {"step": step, "time": time.time(), **{name: _json_value(v) for name, v in values.items()}}
        if not self.output:
            return record
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        if EXPERT_LOAD in host:
            counts = np.rint(np.asarray(host[EXPERT_LOAD])).astype(np.int64).tolist()
            self._expert_load.write(json.dumps({"step": step, EXPERT_LOAD: counts}) + "\n")
            self._expert_load.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._tensorboard.flush()
        return record

    def close(self) -> None:
        if not self.output:
            return
        self._jsonl.close()
        self._expert_load.close()
        self._tensorboard.close()
