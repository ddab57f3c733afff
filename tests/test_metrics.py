"""The metrics writer: progress line, metrics.jsonl and TensorBoard events agree; derived throughput,
MFU and ETA follow from an injected clock and leave out the first write's interval (the compile);
NaN/Inf values are recorded as strict JSON; a resumed run replaces the records an interrupted run
wrote after its last checkpoint (in metrics.jsonl and expert_load.jsonl); the step's expert load goes
to expert_load.jsonl, not to the scalars; without output (processes other than 0) nothing is written."""

import json
import math

import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from trainer.metrics import EXPERT_LOAD, EXPERT_LOAD_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsWriter, progress_line

TOTAL_STEPS, TOKENS_PER_STEP = 100, 2048
FLOPS_PER_TOKEN, PEAK_FLOPS = 1e9, 8e12
SECONDS_PER_STEP = 0.5


class FakeClock:
    """Time that moves only when the test says so, so rates are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _step_metrics(step):
    """What trainer.step returns: device scalars, plus the per-layer expert load, which is no scalar."""
    return {
        "loss": jnp.float32(3.0 - 0.01 * step),
        "learning_rate": jnp.float32(1e-3),
        "grad_norm": jnp.float32(0.5),
        "expert_load_max_over_mean": jnp.float32(1.25),
        "dropped_assignments": jnp.float32(3.0),
        EXPERT_LOAD: jnp.full((4, 8), step, jnp.float32),
    }


def _writer(workdir, clock, start_step=0, output=True):
    return MetricsWriter(
        workdir,
        total_steps=TOTAL_STEPS,
        tokens_per_step=TOKENS_PER_STEP,
        flops_per_token=FLOPS_PER_TOKEN,
        peak_flops=PEAK_FLOPS,
        start_step=start_step,
        clock=clock,
        output=output,
    )


def _strict_json(line):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def _tensorboard_scalars(logdir):
    accumulator = event_accumulator.EventAccumulator(str(logdir))
    accumulator.Reload()
    return {
        tag: [(event.step, float(tensor_util.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]
        for tag in accumulator.Tags()["tensors"]
    }


def test_without_output_the_record_is_computed_and_nothing_written(tmp_path):
    """Processes other than 0 of a multi-process run: the loop still reads the record."""
    clock = FakeClock()
    writer = _writer(tmp_path / "run", clock, output=False)
    writer.mark(0)
    clock.now += 10 * SECONDS_PER_STEP
    record = writer.write(10, _step_metrics(10))
    writer.close()
    assert record["loss"] == pytest.approx(2.9)
    assert record["tokens_per_second"] == pytest.approx(TOKENS_PER_STEP / SECONDS_PER_STEP)
    assert not (tmp_path / "run").exists()


def test_records_agree_and_rates_follow_the_clock(tmp_path):
    clock = FakeClock()
    writer = _writer(tmp_path, clock)
    writer.mark(0)
    logged_steps = (10, 20)
    records = []
    for step in logged_steps:
        clock.now += 10 * SECONDS_PER_STEP
        records.append(writer.write(step, _step_metrics(step)))
    writer.close()
    line = progress_line(records[-1])

    assert records == [_strict_json(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(logged_steps)
    tokens_per_second = TOKENS_PER_STEP / SECONDS_PER_STEP
    last = records[-1]
    assert last["loss"] == pytest.approx(2.8)
    assert last["tokens_per_second"] == pytest.approx(tokens_per_second)
    assert last["mfu"] == pytest.approx(tokens_per_second * FLOPS_PER_TOKEN / PEAK_FLOPS)
    assert last["eta_seconds"] == pytest.approx((TOTAL_STEPS - 20) * SECONDS_PER_STEP)
    assert EXPERT_LOAD not in last, "arrays are not scalars to log"
    loads = [_strict_json(line) for line in (tmp_path / EXPERT_LOAD_FILE).read_text().splitlines()]
    assert loads == [{"step": step, EXPERT_LOAD: [[step] * 8] * 4} for step in logged_steps]

    scalars = _tensorboard_scalars(tmp_path / TENSORBOARD_DIR)
    for name in (
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "mfu",
        "eta_seconds",
        "expert_load_max_over_mean",
        "dropped_assignments",
    ):
        assert [step for step, _ in scalars[name]] == list(logged_steps), name
        assert scalars[name][-1][1] == pytest.approx(last[name], rel=1e-6), name

    for part in (
        "step 20: loss 2.8000",
        "lr 1.000e-03",
        "grad_norm 0.5",
        "4,096 tok/s",
        "MFU 51.20%",
        "load max/mean 1.250",
        "drops 3",
        "ETA 0:00:40",
    ):
        assert part in line, (part, line)


def test_the_first_write_has_no_throughput_and_the_next_measures_from_it(tmp_path):
    """The first interval holds the step's compilation (jit compiles on the first call): no tokens/s,
    MFU or ETA for it, on file or on the line; the next write measures from the end of the first step."""
    clock = FakeClock()
    writer = _writer(tmp_path, clock)
    clock.now += 60.0 + SECONDS_PER_STEP
    first = writer.write(1, _step_metrics(1))
    clock.now += 9 * SECONDS_PER_STEP
    second = writer.write(10, _step_metrics(10))
    writer.close()
    assert not {"tokens_per_second", "mfu", "eta_seconds"} & set(first)
    assert not {"tok/s", "MFU", "ETA"} & set(progress_line(first).split())
    tokens_per_second = TOKENS_PER_STEP / SECONDS_PER_STEP
    assert second["tokens_per_second"] == pytest.approx(tokens_per_second)
    line = progress_line(second)
    for part in (
        f"{tokens_per_second:,.0f} tok/s",
        f"MFU {tokens_per_second * FLOPS_PER_TOKEN / PEAK_FLOPS:.2%}",
        "ETA 0:00:45",
    ):
        assert part in line, (part, line)


def test_progress_line_of_a_refused_step_says_so():
    line = progress_line({"step": 3, "loss": "nan", "learning_rate": 1e-3, "grad_norm": "inf"}, refused=True)
    assert line == "step 3: loss nan | lr 1.000e-03 | grad_norm inf (non-finite: update not applied)"


def test_mark_restarts_the_throughput_clock(tmp_path):
    """Time spent compiling or evaluating before `mark` does not count against tokens/s."""
    clock = FakeClock()
    writer = _writer(tmp_path, clock)
    writer.write(1, _step_metrics(1))
    clock.now += 60.0
    writer.mark(1)
    clock.now += 9 * SECONDS_PER_STEP
    record = writer.write(10, _step_metrics(10))
    writer.close()
    assert record["tokens_per_second"] == pytest.approx(TOKENS_PER_STEP / SECONDS_PER_STEP)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_are_recorded_as_strings(tmp_path, bad):
    clock = FakeClock()
    writer = _writer(tmp_path, clock)
    clock.now += 1.0
    writer.write(7, dict(_step_metrics(7), loss=jnp.float32(bad), nonfinite_steps=jnp.int32(2)))
    writer.close()
    record = _strict_json((tmp_path / METRICS_FILE).read_text().splitlines()[-1])
    assert record["step"] == 7 and record["loss"] == str(bad) and record["nonfinite_steps"] == 2
    line = progress_line(record)
    assert f"loss {bad:.4f}" in line and "non-finite steps skipped 2" in line, line


def _steps_on_file(workdir):
    return [_strict_json(line)["step"] for line in (workdir / METRICS_FILE).read_text().splitlines()]


def test_a_resumed_run_appends(tmp_path):
    """Restarting in the same workdir from the last written step keeps the earlier records."""
    for step in (5, 6):
        writer = _writer(tmp_path, FakeClock(), start_step=step - 1)
        writer.write(step, _step_metrics(step))
        writer.close()
    assert _steps_on_file(tmp_path) == [5, 6]


def test_a_resume_drops_the_records_after_its_checkpoint(tmp_path):
    """A run killed at step 5 after checkpointing step 3 wrote records 4 and 5 (the last one cut
    short); resumed from step 3 it writes them again, and each step is on file once."""
    writer = _writer(tmp_path, FakeClock())
    for step in range(1, 6):
        writer.write(step, _step_metrics(step))
    writer.close()
    path = tmp_path / METRICS_FILE
    path.write_text(path.read_text() + '{"step": 6, "lo')
    resumed = _writer(tmp_path, FakeClock(), start_step=3)
    assert _steps_on_file(tmp_path) == [1, 2, 3]
    for step in (4, 5):
        resumed.write(step, _step_metrics(step))
    resumed.close()
    assert _steps_on_file(tmp_path) == [1, 2, 3, 4, 5]
    loads = [_strict_json(line) for line in (tmp_path / EXPERT_LOAD_FILE).read_text().splitlines()]
    assert [load["step"] for load in loads] == [1, 2, 3, 4, 5]
