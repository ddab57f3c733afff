"""The README's main job, run as a user runs it (a subprocess on its own emulated topology): it trains,
evaluates, writes checkpoints and metrics; stopped part-way by a real signal and restarted with the
same workdir, it ends bit-identical to an uninterrupted run (parameters, optimizer state, routing
biases, data position) with the same loss at every step.

Three processes in the default set: a straight run, a run stopped by SIGTERM, and its resume. The
SIGKILL variant and the non-finite policies run end to end (two more processes each) are marked slow.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
SAVE_EVERY = 2
RUN = [
    "--config=configs/tiny.py",
    f"--steps={STEPS}",
    "--config.checkpoint.log_every=1",
    f"--config.checkpoint.save_every={SAVE_EVERY}",
]
WITH_EVAL = ["--config.eval.num_examples=8", "--config.eval.batch_rows=8"]
NO_EVAL = ["--config.eval.num_examples=0"]
# Generous bounds for a loaded 2-core machine, never reached when things work.
RUN_TIMEOUT_S = 900
POLL_S = 0.2


def _spawn(argv, logs: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """`python *argv` in the background from the repo root, emulating its own devices (no XLA_FLAGS
    from conftest) and with `env` added to its environment; stdout/stderr go to
    `logs/<name>.stdout|stderr` (a pipe nobody reads would fill up with the checkpoint logs and stall
    the child)."""
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **(env or {})}
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        stdout=(logs / f"{name}.stdout").open("w"),
        stderr=(logs / f"{name}.stderr").open("w"),
        text=True,
    )


def _start(workdir: Path, name: str, flags, run=tuple(RUN)) -> subprocess.Popen:
    """train.py in the background; its output goes to files next to the workdir."""
    return _spawn(["train.py", f"--workdir={workdir}", *run, *flags], workdir.parent, name)


def _finish(
    process: subprocess.Popen, logs: Path, name: str, returncode: int = 0, timeout: float = RUN_TIMEOUT_S
) -> tuple[str, str]:
    """Waits for `process` (started by `_spawn`), checks how it ended, -> its (stdout, stderr)."""
    process.wait(timeout=timeout)
    stderr = (logs / f"{name}.stderr").read_text()
    assert process.returncode == returncode, stderr[-3000:]
    return (logs / f"{name}.stdout").read_text(), stderr


def _output(process: subprocess.Popen, workdir: Path, name: str, returncode: int = 0) -> str:
    """Waits for train.py started by `_start`, checks how it ended, -> its stdout."""
    return _finish(process, workdir.parent, name, returncode)[0]


def _run(workdir: Path, name: str, flags) -> str:
    return _output(_start(workdir, name, flags), workdir, name)


def _records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_until(condition, process: subprocess.Popen, what: str):
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        assert process.poll() is None, f"train.py exited with {process.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def _has_step(workdir: Path, step: int):
    return lambda: any(r["step"] >= step for r in _records(workdir))


def _complete_steps(workdir: Path) -> list[int]:
    """Steps with a complete checkpoint directory (an interrupted save is `<step>.orbax-checkpoint-tmp`)."""
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _losses(workdir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl; each step is recorded exactly once."""
    records = _records(workdir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps recorded out of order or twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _saved_run(workdir: Path, step: int):
    """(train state, data-iterator state) of the checkpoint of `step`, restored on the tiny config's mesh."""
    from configs import tiny
    from mesh.sharding import activate
    from model.args import from_config
    from trainer.checkpointing import Checkpointer, abstract_train_state
    from trainer.optimizer import build_optimizer
    from trainer.sharded_init import build_mesh
    from trainer.state import abstract_params

    config = tiny.get_config()
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    with activate(mesh, rules):
        abstract = abstract_train_state(args, mesh, rules, build_optimizer(config.optimizer, abstract_params(args)))
    checkpointer = Checkpointer(workdir, config, keep=1, save_every=1)
    try:
        return checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()


def _assert_same_run(workdir: Path, reference: Path):
    """Bitwise the same final checkpoint (every leaf) and data position, and the same loss at every step."""
    (ours, our_data), (theirs, their_data) = _saved_run(workdir, STEPS), _saved_run(reference, STEPS)
    assert our_data == their_data
    chex.assert_trees_all_equal(ours, theirs, strict=True)
    assert _losses(workdir) == _losses(reference)
    assert sorted(_losses(reference)) == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of STEPS steps, with held-out evaluation -> (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    return workdir, _run(workdir, "straight", WITH_EVAL)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """A run sent SIGTERM once it has logged step 2, then resumed to STEPS with evaluation
    -> (workdir, stdout of the stopped run, stdout of the resume)."""
    workdir = tmp_path_factory.mktemp("preempted") / "run"
    process = _start(workdir, "stopped", NO_EVAL)
    _wait_until(_has_step(workdir, 2), process, "step 2 in metrics.jsonl")
    process.send_signal(signal.SIGTERM)
    stopped = _output(process, workdir, "stopped")
    return workdir, stopped, _run(workdir, "resumed", WITH_EVAL)


def _accuracy_lines(stdout: str) -> list[str]:
    return re.findall(r"held-out exact match .*", stdout)


def test_main_job_trains_evaluates_and_checkpoints(straight):
    workdir, stdout = straight
    assert "on topology cm384-8 (8 devices)" in stdout
    before, after = _accuracy_lines(stdout)
    assert re.fullmatch(r"held-out exact match before training: [0-9.]+ \(\d+/8\)", before), stdout
    assert re.fullmatch(rf"held-out exact match after {STEPS} steps: [0-9.]+ \(\d+/8\)", after), stdout
    losses = _losses(workdir)
    assert list(losses) == list(range(1, STEPS + 1))
    assert all(0 < loss < 20 for loss in losses.values()), losses
    assert _complete_steps(workdir) == list(range(SAVE_EVERY, STEPS + 1, SAVE_EVERY))


def test_the_run_draws_its_pictures(straight):
    """Every logged step's expert load is on file, and the end of the run draws it and the curves
    (trainer/pictures.py; tests/test_pictures.py reads the pictures themselves)."""
    from configs import tiny
    from model.args import from_config

    workdir, stdout = straight
    args = from_config(tiny.get_config().model)
    loads = [json.loads(line) for line in (workdir / "expert_load.jsonl").read_text().splitlines()]
    assert [load["step"] for load in loads] == list(range(1, STEPS + 1))
    assert np.asarray(loads[-1]["expert_load"]).shape == (
        args.num_layers + args.num_mtp_layers,
        args.num_routed_experts,
    )
    pictures = [workdir / "pictures" / name for name in ("curves.png", "expert_load.png")]
    assert f"pictures: {pictures[0]}, {pictures[1]}" in stdout
    assert all(path.stat().st_size > 0 for path in pictures)


def test_sigterm_saves_the_step_and_exits_zero(preempted):
    workdir, stopped, resumed = preempted
    match = re.search(r"SIGTERM received: saved step (\d+) and stopping", stopped)
    assert match, stopped
    step = int(match.group(1))
    assert 2 <= step < STEPS
    assert "held-out exact match" not in stopped, "num_examples=0 skips evaluation"
    assert f"resumed from step {step} " in resumed
    assert "held-out exact match before" not in resumed
    assert [int(s) for s in re.findall(r"step (\d+): loss", resumed)] == list(range(step + 1, STEPS + 1))


def test_preempted_run_ends_like_the_straight_run(straight, preempted):
    workdir, _, resumed = preempted
    _assert_same_run(workdir, straight[0])
    assert _accuracy_lines(resumed) == _accuracy_lines(straight[1])[1:]


@pytest.mark.slow
def test_killed_run_resumes_from_the_last_complete_checkpoint(straight, tmp_path):
    """SIGKILL (no chance to save) once step 2's checkpoint is complete and step 3 is logged: the
    resume starts from the newest complete checkpoint, and metrics.jsonl drops the records the killed
    run wrote after it, which the resumed run writes again."""
    workdir = tmp_path / "run"
    process = _start(workdir, "killed", NO_EVAL)
    _wait_until(
        lambda: SAVE_EVERY in _complete_steps(workdir) and _has_step(workdir, SAVE_EVERY + 1)(),
        process,
        "a complete checkpoint and a later step",
    )
    process.send_signal(signal.SIGKILL)
    _output(process, workdir, "killed", returncode=-signal.SIGKILL)
    latest = max(_complete_steps(workdir))
    resumed = _run(workdir, "resumed", NO_EVAL)
    assert f"resumed from step {latest} " in resumed
    _assert_same_run(workdir, straight[0])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_an_overflowing_update_is_never_applied(tmp_path, policy):
    """A learning rate of 1e30 (0 at step 1, in warmup) makes step 2's update norm overflow. "stop":
    the run exits non-zero naming step 2, with step 1 the last checkpoint; "skip": it runs to the end,
    every later update refused and counted, and the checkpoints of steps 2 to 4 all hold step 1's
    finite state (the oldest kept one is step 2's: keep=3)."""
    workdir = tmp_path / "run"
    run = [
        "--config=configs/tiny.py",
        "--steps=4",
        "--config.checkpoint.log_every=1",
        "--config.checkpoint.save_every=1",
        "--config.optimizer.learning_rate=1e30",
    ]
    process = _start(workdir, policy, [*NO_EVAL, f"--config.train.nonfinite={policy}"], run=run)
    if policy == "stop":
        _output(process, workdir, policy, returncode=1)
        stderr = (workdir.parent / f"{policy}.stderr").read_text()
        assert re.search(
            r"NonFiniteStepError: step 2: loss [0-9.]+, grad_norm [0-9.]+, update_norm inf: not finite", stderr
        ), stderr[-3000:]
        assert _complete_steps(workdir) == [1]
        records = _records(workdir)
        assert [r["step"] for r in records] == [1, 2] and records[-1]["nonfinite"] == 1
    else:
        stdout = _output(process, workdir, policy)
        assert stdout.count("(non-finite: update not applied)") == 3, stdout
        records = _records(workdir)
        assert [(r["step"], r["nonfinite"], r["nonfinite_steps"]) for r in records] == [
            (1, 0, 0),
            (2, 1, 1),
            (3, 1, 2),
            (4, 1, 3),
        ]
        assert _complete_steps(workdir)[-1] == 4
        last, _ = _saved_run(workdir, 4)
        first_refused, _ = _saved_run(workdir, 2)
        assert int(last.step) == 4 and int(last.nonfinite_steps) == 3 and int(first_refused.nonfinite_steps) == 1
        kept = (last.params, last.opt_state, last.routing)
        chex.assert_tree_all_finite(kept)
        chex.assert_trees_all_equal(
            kept, (first_refused.params, first_refused.opt_state, first_refused.routing), strict=True
        )


def _objective_run(tmp_path, name: str, flags) -> tuple[str, list[dict]]:
    workdir = tmp_path / name
    stdout = _run(workdir, name, [*NO_EVAL, "--steps=3", "--config.checkpoint.save_every=3", *flags])
    assert _complete_steps(workdir) == [3]
    return stdout, _records(workdir)


@pytest.mark.slow  # ~3 min; DPO on the step is in test_objective_steps.py
def test_dpo_from_the_main_job_checkpoint(straight, tmp_path):
    """DPO started from an SFT run: the reference is that run's weights, so the first step's loss is
    exactly log 2 (policy == reference), and the pairs' margin then grows."""
    stdout, records = _objective_run(
        tmp_path, "dpo", ["--config.objective=dpo", f"--init_checkpoint={straight[0]}", "--config.dpo.beta=0.5"]
    )
    assert f"initial weights from {straight[0]}" in stdout
    assert abs(records[0]["main_loss"] - np.log(2.0)) < 1e-5, records[0]
    assert records[0]["pairs"] == 8 and records[-1]["dpo_margin"] > records[0]["dpo_margin"], records


@pytest.mark.slow  # ~4 min
def test_dpo_from_stored_reference_logps(straight, tmp_path):
    """score_preferences.py scores the shipped pairs with the SFT run's weights; DPO from those weights
    with `reference=data` then needs no reference forward and starts at log 2, like the in-step one."""
    scored = tmp_path / "scored.jsonl"
    process = _spawn(
        ["score_preferences.py", "--config=configs/tiny.py", f"--init_checkpoint={straight[0]}", f"--output={scored}"],
        tmp_path,
        "score",
    )
    stdout, _ = _finish(process, tmp_path, "score")
    assert f"wrote {scored}: {{'scored': 300, 'dropped_too_long': 0, 'skipped': 0}}" in stdout
    _, records = _objective_run(
        tmp_path,
        "dpo_stored",
        [
            "--config.objective=dpo",
            "--config.dpo.reference=data",
            f"--init_checkpoint={straight[0]}",
            "--config.dpo.beta=0.5",
            f"--config.data.preference_sources=(('{scored}', 1.0),)",
        ],
    )
    assert abs(records[0]["main_loss"] - np.log(2.0)) < 1e-4, records[0]
    assert records[0]["pairs"] == 8 and records[-1]["dpo_margin"] > records[0]["dpo_margin"], records


@pytest.mark.slow
def test_grpo_on_the_shipped_rollouts_and_distillation_from_a_teacher(straight, tmp_path):
    """GRPO on data/sample/rollouts.jsonl (rewards and sampling log-probs from the file) and on-policy
    distillation (the student samples on the mesh, the main job's weights teach) run end to end."""
    _, grpo = _objective_run(
        tmp_path, "grpo", ["--config.objective=grpo", f"--config.grpo.rollouts={ROOT / 'data/sample/rollouts.jsonl'}"]
    )
    assert all(np.isfinite(r["loss"]) and 0 <= r["rollout/reward_mean"] <= 1 for r in grpo), grpo
    _, distill = _objective_run(
        tmp_path, "distill", ["--config.objective=distill", f"--config.distill.teacher={straight[0]}"]
    )
    assert all(r["reverse_kl"] > 0 for r in distill), distill


def test_the_best_checkpoint_by_a_step_metric_is_kept(tmp_path):
    """keep_best_metric receives each saved step's metrics: with keep=1 and mode max on the loss, the
    run keeps its latest step and the step of the highest loss (from metrics.jsonl)."""
    workdir = tmp_path / "run"
    _run(
        workdir,
        "best",
        NO_EVAL
        + [
            "--config.checkpoint.save_every=1",
            "--config.checkpoint.keep=1",
            "--steps=4",
            "--config.checkpoint.keep_best_metric=loss",
            "--config.checkpoint.keep_best_mode=max",
        ],
    )
    losses = {record["step"]: record["loss"] for record in _records(workdir)}
    kept = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert kept == sorted({max(losses, key=losses.get), 4}), (kept, losses)


def test_running_out_of_data_saves_and_ends_cleanly(tmp_path):
    """data.num_epochs=1 over 12 one-row examples: one batch of 8, then the data ends at step 1; the
    run saves step 1, says so and exits 0, and its resume does the same without training again."""
    records = [{"prompt": "add 1 2 and then sort these words please " * 7, "completion": f"{n}"} for n in range(12)]
    data = tmp_path / "finite.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    flags = NO_EVAL + ["--config.data.num_epochs=1", f"--config.data.sft_sources=(('{data}', 1.0),)"]
    workdir = tmp_path / "run"
    for name in ("first", "again"):
        stdout = _run(workdir, name, flags)
        assert (
            "data stream 0 of 1 ran out after data.num_epochs=1 epoch(s) of its sources: saved step 1 and "
            "ending the run" in stdout
        ), stdout
    assert "step 1: loss" in (workdir.parent / "first.stdout").read_text()
    assert "step 1: loss" not in stdout and "resumed from step 1" in stdout
    assert sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit()) == [1]
