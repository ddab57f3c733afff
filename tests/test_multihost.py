"""Several processes, one run (trainer/distributed.py, trainer/batches.py), with real processes on
loopback: 2 processes x 4 emulated devices against 1 process x 8 devices of the tiny config's cm384-8.

Default set (no model is compiled, tests/multihost_worker.py): where the process settings come from;
the global batches one process reads equal those two processes assemble, and their gathered data
positions agree, whether the processes are told who they are by flags or by Slurm's or Open MPI's
environment, and with emulated or the platform's own devices (--noemulate; too few are refused);
DPO pairs with stored reference log-probabilities likewise; a SIGKILLed process (worker or
coordinator) makes the other abort within the heartbeat timeout; a live process that stops joining
the collectives stops the run after the collective timeout.

Slow set, train.py end to end (each run compiles the tiny step, minutes on 2 loaded cores): 2
processes train and evaluate like 1 (every step's loss and the final checkpoint within the
tolerances below, not bitwise; the same held-out accuracy); a checkpoint saved by 2 processes
resumes in 1 and the reverse, ending like the uninterrupted run; a process SIGKILLed mid-run makes
the other exit with the runtime's error within the bound, and the last complete checkpoint restores,
close to the uninterrupted run's at that step.
"""

import json
import re
import shutil
import signal
import socket
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from configs import tiny
from tests.conftest import COMPILATION_CACHE_ENV
from tests.test_train_main import (
    NO_EVAL,
    WITH_EVAL,
    _accuracy_lines,
    _complete_steps,
    _finish,
    _has_step,
    _losses,
    _output,
    _saved_run,
    _spawn,
    _start,
    _wait_until,
)
from tests.multihost_worker import worker_config
from trainer import distributed
from trainer.batch_source import build_batch_source
from trainer.batches import GlobalBatches
from trainer.sharded_init import build_mesh
from trainer.step import batch_sharding_of

STREAMS = 2
PROCESSES = 2
HEARTBEAT_S = 10
# A dead peer is noticed within the heartbeat timeout; the rest is the survivor's own exit on a
# loaded machine.
EXIT_BOUND_S = HEARTBEAT_S + 50
FATAL = "JAX distributed service detected fatal errors"


@pytest.fixture(scope="module", autouse=True)
def _no_compilation_cache():
    """The processes this module starts run without the suite's persistent compilation cache
    (tests/conftest.py): with a shared cache, two resumes that loaded the step from it stopped in
    their first step, the devices waiting in different collectives. Off the cache, these runs
    compile their own programs and leave none behind for the other tests' runs."""
    with pytest.MonkeyPatch.context() as patch:
        for name in COMPILATION_CACHE_ENV:
            patch.delenv(name, raising=False)
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_flags(index: int, port: int) -> list[str]:
    return [
        f"--num_processes={PROCESSES}",
        f"--process_id={index}",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--heartbeat_timeout_s={HEARTBEAT_S}",
        f"--shutdown_timeout_s={HEARTBEAT_S}",
    ]


@pytest.fixture
def parsed_flags():
    """The distributed flags readable in this process (absl parses them only in an app's main)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    with flagsaver.flagsaver():
        yield


def test_process_settings_from_flags_then_environment(parsed_flags):
    assert distributed.from_flags(env={}).count == 1
    explicit = {
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
        "JAX_COORDINATOR_ADDRESS": "h0:1234",
        "SLURM_NTASKS": "8",
        "SLURM_PROCID": "5",
    }
    got = distributed.from_flags(env=explicit)
    assert (got.count, got.index, got.coordinator) == (4, 3, "h0:1234")
    slurm = distributed.from_flags(env={"SLURM_NTASKS": "8", "SLURM_PROCID": "5"})
    assert (slurm.count, slurm.index, slurm.coordinator) == (8, 5, None)  # JAX finds the coordinator
    flags.FLAGS.num_processes, flags.FLAGS.process_id = 2, 1
    assert (distributed.from_flags(env=explicit).count, distributed.from_flags(env=explicit).index) == (2, 1)
    flags.FLAGS.num_processes = 1
    with pytest.raises(ValueError, match="process id 1 given for a single-process run"):
        distributed.from_flags(env={})


def _one_process_batches(count: int, preferences: str | None = None) -> tuple[list[dict], list]:
    """`count` global batches of the workers' config read with STREAMS streams by this one process (8
    devices), and the data position after them."""
    config = worker_config(STREAMS, preferences)
    source = build_batch_source(config, batch_sharding_of(build_mesh(config.mesh), config.mesh.rules), graphdef=None)
    seen = [{key: np.asarray(array) for key, array in source.next(None).items()} for _ in range(count)]
    return seen, source.get_state()


def test_one_process_reads_every_stream():
    """Stream s fills rows [s*B/S, (s+1)*B/S), and a restored position continues where it was."""
    from data.pipeline import build_sft_pipeline

    config = tiny.get_config().data
    config.streams = STREAMS
    sharding = batch_sharding_of(build_mesh(tiny.get_config().mesh), tiny.get_config().mesh.rules)
    batches = GlobalBatches(config, sharding)
    first = next(batches)
    streams = [next(iter(build_sft_pipeline(config, process_index=s, process_count=STREAMS))) for s in range(STREAMS)]
    rows = config.global_batch_size // STREAMS
    for key, array in first.items():
        assert array.sharding == sharding
        for s, stream in enumerate(streams):
            np.testing.assert_array_equal(np.asarray(array)[s * rows : (s + 1) * rows], stream[key])
    state = batches.get_state()
    assert len(state) == STREAMS
    expected = next(batches)
    resumed = GlobalBatches(config, sharding)
    resumed.set_state(json.loads(json.dumps(state)))
    for key, array in next(resumed).items():
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected[key]))
    config.streams = 4
    with pytest.raises(ValueError, match="has 2 streams and this run reads 4: run with --config.data.streams=2"):
        GlobalBatches(config, sharding).set_state(state)


def test_streams_of_one_process_read_the_files_once(monkeypatch):
    """Four streams on one process: each source file is read (and validated, encoded) once, not once
    per stream."""
    import data.pipeline

    reads = []
    real = data.pipeline.read_records
    monkeypatch.setattr(
        data.pipeline, "read_records", lambda pattern, *a, **k: reads.append(pattern) or real(pattern, *a, **k)
    )
    config = tiny.get_config().data
    config.streams = 4
    GlobalBatches(config, batch_sharding_of(build_mesh(tiny.get_config().mesh), tiny.get_config().mesh.rules))
    assert reads == [pattern for pattern, _ in config.sft_sources]


# Ports a launcher's environment makes JAX derive (jax/_src/clusters): 61440 + job id mod 4096.
DERIVED_PORTS = 61440
DERIVED_PORT_RANGE = 4096
OMPI_JOB_ID_UNIT = 4096  # Open MPI job ids are multiples of 2^12; JAX divides them out


def _free_derived_port() -> int:
    """A free port in the range JAX derives coordinator ports from."""
    for port in np.random.default_rng().permutation(DERIVED_PORT_RANGE) + DERIVED_PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", int(port)))
            except OSError:
                continue
            return int(port)
    raise RuntimeError("no free port to derive")


def _launcher_env(launcher: str, index: int, port: int) -> dict:
    """What Slurm (srun) or Open MPI (mpirun) would put in process `index`'s environment on one host,
    with the job id chosen so that JAX derives `port` for the coordinator."""
    job = port - DERIVED_PORTS
    if launcher == "slurm":
        return {
            "SLURM_JOB_ID": str(job),
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_NTASKS": str(PROCESSES),
            "SLURM_PROCID": str(index),
            "SLURM_LOCALID": str(index),
            "SLURM_STEP_NUM_NODES": "1",
        }
    return {
        "OMPI_MCA_orte_hnp_uri": f"{job * OMPI_JOB_ID_UNIT}.0;tcp://127.0.0.1:1",
        "OMPI_COMM_WORLD_SIZE": str(PROCESSES),
        "OMPI_COMM_WORLD_RANK": str(index),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(index),
    }


def _workers(tmp_path: Path, extra=(), launcher: str = "flags", env: dict | None = None) -> list:
    """PROCESSES workers of one run, told who they are by flags or by a launcher's environment."""
    if launcher == "flags":
        port = _free_port()
        return [
            _spawn(
                ["-m", "tests.multihost_worker", f"--out={tmp_path}", *_process_flags(i, port), *extra],
                tmp_path,
                f"worker{i}",
                env,
            )
            for i in range(PROCESSES)
        ]
    port = _free_derived_port()
    timeouts = [f"--heartbeat_timeout_s={HEARTBEAT_S}", f"--shutdown_timeout_s={HEARTBEAT_S}"]
    return [
        _spawn(
            ["-m", "tests.multihost_worker", f"--out={tmp_path}", *timeouts, *extra],
            tmp_path,
            f"worker{i}",
            {**_launcher_env(launcher, i, port), **(env or {})},
        )
        for i in range(PROCESSES)
    ]


def _assert_batches_of_one(tmp_path: Path, processes: list, preferences: str | None = None):
    """Every worker ends well and saw the global batches (and data position) one process reads."""
    for i, process in enumerate(processes):
        _finish(process, tmp_path, f"worker{i}")
    expected, expected_state = _one_process_batches(2, preferences)
    for i in range(PROCESSES):
        seen = np.load(tmp_path / f"process_{i}.npz")
        assert sorted(seen) == sorted(f"{b}/{key}" for b in range(len(expected)) for key in expected[b])
        for b, batch in enumerate(expected):
            for key, array in batch.items():
                np.testing.assert_array_equal(seen[f"{b}/{key}"], array, err_msg=f"process {i} batch {b} {key}")
        stands = json.loads((tmp_path / f"process_{i}.json").read_text())
        assert stands == {
            "position": expected_state,
            "process_index": i,
            "process_count": PROCESSES,
            "local_devices": 8 // PROCESSES,
        }


# Each process brings 4 CPU devices of its own, as an accelerator host brings its chips.
PLATFORM_DEVICES = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.mark.parametrize(
    "launcher,extra,env",
    [
        ("flags", [], None),
        ("slurm", [], None),
        ("ompi", [], None),
        ("flags", ["--noemulate"], PLATFORM_DEVICES),
    ],
    ids=["flags", "slurm environment", "open mpi environment", "platform devices (--noemulate)"],
)
def test_two_processes_assemble_the_batches_of_one(tmp_path, launcher, extra, env):
    """However the processes learn who they are (flags; Slurm's or Open MPI's variables, with the
    coordinator derived by JAX) and whether the devices are emulated or the platform's own."""
    _assert_batches_of_one(tmp_path, _workers(tmp_path, extra, launcher, env))


def test_a_process_without_its_share_of_devices_is_refused(tmp_path):
    """--noemulate on hosts that bring 3 devices each, for a topology of 8: the mesh names the gap."""
    processes = _workers(
        tmp_path, ["--noemulate"], env={**PLATFORM_DEVICES, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    )
    for i, process in enumerate(processes):
        _, stderr = _finish(process, tmp_path, f"worker{i}", returncode=1)
        assert "cm384-8" in stderr and "8 devices" in stderr and "6" in stderr, stderr[-2000:]


def test_two_processes_assemble_the_stored_reference_pairs_of_one(tmp_path):
    """DPO with reference=data: the pairs' reference log-probabilities reach the rows they belong to."""
    source = Path(tiny.get_config().data.preference_sources[0][0])
    pairs = tmp_path / "scored.jsonl"
    with source.open() as f, pairs.open("w") as out:
        for line_number, line in enumerate(f):
            # Distinct per pair, so a row paired with another's values is caught.
            record = dict(json.loads(line), ref_chosen_logps=-1.0 - line_number, ref_rejected_logps=-0.5 - line_number)
            out.write(json.dumps(record) + "\n")
    _assert_batches_of_one(tmp_path, _workers(tmp_path, [f"--preferences={pairs}"]), str(pairs))


@pytest.mark.parametrize("killed", [1, 0], ids=["worker killed", "coordinator killed"])
def test_a_killed_process_stops_the_other(tmp_path, killed):
    processes = _workers(tmp_path, ["--wait_forever"])
    _wait_until(
        lambda: all((tmp_path / f"process_{i}.json").exists() for i in range(PROCESSES)),
        processes[1 - killed],
        "both processes running",
    )
    processes[killed].send_signal(signal.SIGKILL)
    started = time.monotonic()
    survivor = 1 - killed
    _, stderr = _finish(
        processes[survivor], tmp_path, f"worker{survivor}", returncode=-signal.SIGABRT, timeout=EXIT_BOUND_S
    )
    assert time.monotonic() - started < EXIT_BOUND_S
    assert FATAL in stderr
    processes[killed].wait()


COLLECTIVE_TIMEOUT_S = 15
# The waiting process fails after the collective timeout and waits the shutdown timeout for the
# stuck one, whose runtime then aborts it; the rest is slack for a loaded machine.
STALL_BOUND_S = COLLECTIVE_TIMEOUT_S + HEARTBEAT_S + 40


def test_a_stuck_live_process_stops_the_run(tmp_path):
    """Process 1 stays alive (heartbeats go on) but stops joining the collectives: process 0's
    collective fails after --collective_timeout_s with an error that says so; the stuck process
    never reaches the shutdown barrier, whose failure the runtime then reports to both (SIGABRT)."""
    processes = _workers(
        tmp_path, ["--wait_forever", "--stall_process=1", f"--collective_timeout_s={COLLECTIVE_TIMEOUT_S}"]
    )
    _wait_until(
        lambda: all((tmp_path / f"process_{i}.json").exists() for i in range(PROCESSES)),
        processes[0],
        "both processes running",
    )
    started = time.monotonic()
    _, stderr = _finish(processes[0], tmp_path, "worker0", returncode=-signal.SIGABRT, timeout=STALL_BOUND_S)
    assert (
        f"process 0 of 2: a cross-process collective waited longer than --collective_timeout_s="
        f"{COLLECTIVE_TIMEOUT_S} s" in stderr
    ), stderr[-3000:]
    _, stuck = _finish(processes[1], tmp_path, "worker1", returncode=-signal.SIGABRT, timeout=STALL_BOUND_S)
    assert FATAL in stuck
    assert time.monotonic() - started < STALL_BOUND_S


def test_the_collective_timeout_reaches_xla_once():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    distributed._bound_cpu_collectives(30, env)
    distributed._bound_cpu_collectives(40, env)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_collective_timeout_seconds=30"
    env = {"XLA_FLAGS": "--xla_cpu_collective_timeout_seconds=5"}
    distributed._bound_cpu_collectives(30, env)
    assert env["XLA_FLAGS"] == "--xla_cpu_collective_timeout_seconds=5"


# --- train.py end to end --------------------------------------------------------------------

# Shorter than test_train_main's runs: a step across 2 processes (gloo over loopback) took 18 s here.
STEPS = 4
RESUME_AT = 2
RUN = [
    "--config=configs/tiny.py",
    f"--steps={STEPS}",
    "--config.checkpoint.log_every=1",
    f"--config.checkpoint.save_every={RESUME_AT}",
    f"--config.data.streams={STREAMS}",
]


# Not bitwise: gloo sums a cross-process all-reduce in another order than XLA:CPU's in-process one.
# Measured after 4 steps, 2 processes against 1 (attention in query chunks, Muon + AdamW): losses
# within 2.3e-6 relative (step 1 bitwise); the largest leaf differences, relative to each leaf's
# largest magnitude, where gradients cancel to rounding level: 2.2e-2 in the AdamW first moment of
# an MTP mHC bias (values 6.6e-8), 1.4e-2 in an mHC bias (values 8.6e-4: Adam turns a near-zero
# gradient's rounding into a whole lr-sized step). A wrong batch moves the losses by ~1e-3; a shard
# written to the wrong place, or another process's data, moves a leaf by its own size.
LOSS_RTOL = 1e-5
LEAF_TOL = 5e-2  # of the leaf's largest magnitude; integer leaves (step, RNG key) exactly


def _assert_close_checkpoint(workdir: Path, reference: Path, step: int):
    """The checkpoints of `step` agree leaf by leaf within LEAF_TOL, and their data positions exactly."""
    (ours, our_data), (theirs, their_data) = _saved_run(workdir, step), _saved_run(reference, step)
    assert our_data == their_data
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(theirs)):
        a, b = np.asarray(a), np.asarray(b)
        scale = float(np.max(np.abs(b), initial=0)) if np.issubdtype(b.dtype, np.floating) else 0
        np.testing.assert_allclose(a, b, rtol=0, atol=LEAF_TOL * scale, err_msg=jax.tree_util.keystr(path))


def _assert_close_run(workdir: Path, reference: Path):
    """Every step's loss within LOSS_RTOL and the final checkpoint close (`_assert_close_checkpoint`)."""
    ours, theirs = _losses(workdir), _losses(reference)
    assert list(ours) == list(theirs) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(ours.values()), list(theirs.values()), rtol=LOSS_RTOL)
    _assert_close_checkpoint(workdir, reference, STEPS)


def _start_processes(workdir: Path, name: str, flags=tuple(NO_EVAL)) -> list:
    """train.py as PROCESSES processes of one run on loopback, logs `<name>.<id>.stdout|stderr`."""
    port = _free_port()
    return [_start(workdir, f"{name}.{i}", [*_process_flags(i, port), *flags], run=RUN) for i in range(PROCESSES)]


def _run_processes(workdir: Path, name: str, flags=tuple(NO_EVAL)) -> str:
    """Runs train.py in PROCESSES processes to the end -> process 0's stdout; the others print none of
    the run's lines (gloo's connection messages are not ours)."""
    processes = _start_processes(workdir, name, flags)
    outputs = [_output(process, workdir, f"{name}.{i}") for i, process in enumerate(processes)]
    for output in outputs[1:]:
        assert not re.search(r"^(model|step|resumed|held-out)", output, re.MULTILINE), output
    return outputs[0]


def _resumable_copy(workdir: Path, into: Path, step: int) -> Path:
    """A copy of `workdir` whose newest checkpoint is `step` (later ones deleted), as if stopped there."""
    shutil.copytree(workdir, into)
    for later in _complete_steps(into):
        if later > step:
            shutil.rmtree(into / "checkpoints" / str(later))
    return into


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """1 process x 8 devices, STEPS steps, STREAMS data streams, held-out evaluation -> (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    return workdir, _output(_start(workdir, "one", WITH_EVAL, run=RUN), workdir, "one")


@pytest.fixture(scope="module")
def one_process(one_process_run):
    return one_process_run[0]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The same run as 2 processes x 4 devices -> (workdir, process 0's stdout)."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    return workdir, _run_processes(workdir, "two", WITH_EVAL)


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(one_process_run, two_processes):
    """Same losses and final checkpoint (within the tolerances), and the greedy held-out evaluation
    on the 2-process mesh reports what the 1-process one does, before and after training."""
    workdir, stdout = two_processes
    assert "on topology cm384-8 (8 devices) in 2 processes" in stdout
    assert [int(s) for s in re.findall(r"step (\d+): loss", stdout)] == list(range(1, STEPS + 1))
    _assert_close_run(workdir, one_process_run[0])
    assert len(_accuracy_lines(stdout)) == 2
    assert _accuracy_lines(stdout) == _accuracy_lines(one_process_run[1])


@pytest.mark.slow
def test_saved_by_two_processes_resumes_in_one(one_process, two_processes, tmp_path):
    workdir = _resumable_copy(two_processes[0], tmp_path / "run", RESUME_AT)
    stdout = _output(_start(workdir, "resumed", NO_EVAL, run=RUN), workdir, "resumed")
    assert f"resumed from step {RESUME_AT} " in stdout
    _assert_close_run(workdir, one_process)


@pytest.mark.slow
def test_saved_by_one_process_resumes_in_two(one_process, tmp_path):
    workdir = _resumable_copy(one_process, tmp_path / "run", RESUME_AT)
    assert f"resumed from step {RESUME_AT} " in _run_processes(workdir, "resumed")
    _assert_close_run(workdir, one_process)


@pytest.mark.slow
def test_a_killed_process_ends_the_run_and_its_last_checkpoint_restores(one_process, tmp_path):
    """SIGKILL to process 1 once step 2's checkpoint is complete and step 3 is logged: process 0 aborts
    with the runtime's error within the bound, and the newest complete checkpoint holds the state of
    the uninterrupted run at that step."""
    workdir = tmp_path / "run"
    processes = _start_processes(workdir, "killed")
    _wait_until(
        lambda: RESUME_AT in _complete_steps(workdir) and _has_step(workdir, RESUME_AT + 1)(),
        processes[0],
        "a complete checkpoint and a later step",
    )
    processes[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    _output(processes[0], workdir, "killed.0", returncode=-signal.SIGABRT)
    assert time.monotonic() - started < EXIT_BOUND_S
    assert FATAL in (workdir.parent / "killed.0.stderr").read_text()
    processes[1].wait()
    _assert_close_checkpoint(workdir, one_process, max(_complete_steps(workdir)))
