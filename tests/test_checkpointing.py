"""Checkpoints of the train state: bit-exact round trip, retention, incomplete saves, other meshes,
and preemption by a real SIGTERM to a real subprocess.

One small V4 state (4 layers, every attention kind) is made per module from `abstract_train_state`
with random values in every leaf (the optimizer moments too, so a swapped or zeroed leaf shows),
which takes about a second instead of compiling the model's initialiser; a separate test checks
that this abstract state has exactly `create_train_state`'s structure and shardings.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import optax
import pytest

from configs import checkpoint as checkpoint_config
from configs import parallelism
from configs.release import ConfigError
from mesh.sharding import activate
from tests.model_configs import parity_args
from trainer.checkpointing import (
    TMP_SUFFIX,
    Checkpointer,
    abstract_like,
    abstract_train_state,
    check_missing,
    config_to_json,
)
from trainer.preemption import PreemptionGuard
from trainer.sharded_init import build_mesh
from trainer.state import TrainState, create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVE_AXES = dict(fsdp=8)
DATA_STATE = {"next_index": 1234, "epoch": 2, "sources": ["sample/chat.jsonl"]}
# Subprocess tests: generous bounds for a loaded 2-core machine, never reached when things work.
CHILD_TIMEOUT_S = 120


def _args():
    return parity_args(num_layers=4, compress_ratios=(0, 0, 4, 128, 0))


def _mesh_and_rules(**axes):
    mesh_config = parallelism.get_config("cm384-8", **axes)
    return build_mesh(mesh_config), mesh_config.rules


def _random_state(abstract, seed=0):
    """Random values of every leaf's dtype, placed with the leaf's sharding."""
    rng = np.random.default_rng(seed)

    def fill(leaf):
        if np.issubdtype(leaf.dtype, np.floating):
            value = rng.standard_normal(leaf.shape).astype(leaf.dtype)
        else:
            value = rng.integers(0, np.iinfo(leaf.dtype).max, leaf.shape, dtype=leaf.dtype)
        return jax.device_put(value, leaf.sharding)

    return jax.tree.map(fill, abstract)


def _assert_same_state(restored, expected, abstract):
    """Same containers, dtypes, values (bitwise) and the shardings the target asked for."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for (path, ours), theirs, target in zip(
        jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected), jax.tree.leaves(abstract)
    ):
        where = jax.tree_util.keystr(path)
        assert ours.dtype == theirs.dtype, where
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=where)
        assert ours.sharding.is_equivalent_to(target.sharding, ours.ndim), where


def _run_config():
    config = ml_collections.ConfigDict(dict(seed=0, batch_size=8, seq_len=256))
    config.mesh = parallelism.get_config("cm384-8", **SAVE_AXES)
    config.checkpoint = checkpoint_config.get_config(keep=2)
    return config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random train state on fsdp=8, saved once (async) at step 7 -> (workdir, state, abstract)."""
    mesh, rules = _mesh_and_rules(**SAVE_AXES)
    abstract = abstract_train_state(_args(), mesh, rules, optax.adamw(1e-3))
    state = _random_state(abstract)
    workdir = tmp_path_factory.mktemp("run")
    checkpointer = Checkpointer.from_config(workdir, _run_config(), _run_config().checkpoint)
    started = time.perf_counter()
    assert checkpointer.save(7, state, DATA_STATE, force=True)
    blocked = time.perf_counter() - started
    checkpointer.wait()
    megabytes = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    print(f"\nsave {megabytes:.1f} MiB: blocking {blocked:.3f} s, written {time.perf_counter() - started:.3f} s")
    checkpointer.close()
    return workdir, state, abstract


def test_round_trip_is_bit_exact(saved):
    workdir, state, abstract = saved
    checkpointer = Checkpointer.from_config(workdir, _run_config(), _run_config().checkpoint)
    assert checkpointer.latest_step() == 7
    started = time.perf_counter()
    restored, data_state = checkpointer.restore(None, abstract)
    print(f"\nrestore on the saving mesh: {time.perf_counter() - started:.3f} s")
    assert isinstance(restored, TrainState)
    _assert_same_state(restored, state, abstract)
    assert data_state == DATA_STATE
    assert config_to_json(checkpointer.restore_config(7)) == config_to_json(_run_config())
    checkpointer.close()


def _four_device_mesh():
    """fsdp=2 x tensor=2 on the first 4 of the 8 devices: a job restarted on half the machines."""
    names = _mesh_and_rules(**SAVE_AXES)[0].axis_names
    sizes = dict(data=1, fsdp=2, expert=1, tensor=2)
    devices = np.array(jax.devices()[:4]).reshape([sizes[name] for name in names])
    return jax.sharding.Mesh(devices, names), parallelism.get_config("cm384-8").rules


@pytest.mark.parametrize("target", ["fsdp=2,expert=4", "4 devices fsdp=2,tensor=2"])
def test_restore_onto_another_mesh(saved, target):
    workdir, state, _ = saved
    if target.startswith("4 devices"):
        mesh, rules = _four_device_mesh()
    else:
        mesh, rules = _mesh_and_rules(fsdp=2, expert=4)
    abstract = abstract_train_state(_args(), mesh, rules, optax.adamw(1e-3))
    checkpointer = Checkpointer.from_config(workdir, _run_config(), _run_config().checkpoint)
    started = time.perf_counter()
    restored, _ = checkpointer.restore(7, abstract)
    print(f"\nrestore onto {target}: {time.perf_counter() - started:.3f} s")
    _assert_same_state(restored, state, abstract)
    experts = restored.params["groups"][0]["blocks"][0]["moe"]["experts"]["w1"][...]
    saved_experts = state.params["groups"][0]["blocks"][0]["moe"]["experts"]["w1"][...]
    assert experts.sharding.mesh.shape == mesh.shape != saved_experts.sharding.mesh.shape
    assert {shard.device for shard in experts.addressable_shards} == set(mesh.devices.flat)
    checkpointer.close()


def test_abstract_state_matches_create_train_state():
    """The restore target has create_train_state's exact structure, shapes, dtypes and shardings.
    The slowest test here (it compiles the model's initialiser), so on 2 layers that still hold a
    hash layer, a CSA and an HCA layer and the MTP block: half the compile time of 4 layers."""
    args = parity_args(num_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=1)
    mesh, rules = _mesh_and_rules(fsdp=2, expert=4)
    tx = optax.adamw(1e-3)
    with activate(mesh, rules):
        _, state, shardings = create_train_state(args, mesh, rules, tx, seed=0)
    expected = abstract_like(state, shardings)
    abstract = abstract_train_state(args, mesh, rules, tx)
    assert jax.tree.structure(abstract) == jax.tree.structure(expected)
    for (path, ours), theirs in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(expected)):
        assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype), jax.tree_util.keystr(path)
        assert ours.sharding.is_equivalent_to(theirs.sharding, len(ours.shape)), jax.tree_util.keystr(path)


def _toy_state(step):
    """A small pytree whose values say which step wrote it."""
    replicated = jax.sharding.NamedSharding(jax.make_mesh((1,), ("x",)), jax.sharding.PartitionSpec())
    return {
        "w": jax.device_put(np.full((4, 4), step, np.float32), replicated),
        "step": jax.device_put(np.int32(step), replicated),
    }


def _toy_abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _toy_state(0))


def test_keeps_the_last_k_and_saves_on_the_grid(tmp_path):
    checkpointer = Checkpointer(tmp_path, _run_config(), keep=2, save_every=2)
    saved = [checkpointer.save(step, _toy_state(step), {"position": step}) for step in range(1, 7)]
    assert saved == [False, True, False, True, False, True]
    assert checkpointer.save(7, _toy_state(7), {"position": 7}, force=True)
    assert not checkpointer.save(7, _toy_state(7), {"position": 7}, force=True), "a saved step is skipped"
    checkpointer.wait()
    assert checkpointer.all_steps() == [6, 7]
    state, data_state = checkpointer.restore(None, _toy_abstract())
    assert int(state["step"]) == 7 and data_state == {"position": 7}
    checkpointer.close()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keeps_the_best_by_metric(tmp_path, mode):
    checkpointer = Checkpointer(
        tmp_path, _run_config(), keep=2, save_every=1, keep_best_metric="eval_loss", keep_best_mode=mode
    )
    values = {1: 5.0, 2: 1.0, 3: 9.0, 4: 4.0, 5: 3.0, 6: 2.0}
    for step, value in values.items():
        checkpointer.save(step, _toy_state(step), {}, metrics={"eval_loss": value})
    checkpointer.wait()
    best = min(values, key=values.get) if mode == "min" else max(values, key=values.get)
    assert checkpointer.all_steps() == sorted({best, 5, 6})
    assert checkpointer.best_step() == best
    with pytest.raises(KeyError, match="step 7: metrics lack keep_best_metric 'eval_loss'"):
        checkpointer.save(7, _toy_state(7), {}, metrics={"loss": 1.0})
    checkpointer.close()


def test_bytes_data_state_round_trips(tmp_path):
    """Older grain iterators return their state as bytes; JSON carries them base64-encoded."""
    data_state = bytes(range(256))
    checkpointer = Checkpointer(tmp_path, _run_config(), keep=1, save_every=1, async_save=False)
    checkpointer.save(1, _toy_state(1), data_state)
    assert checkpointer.restore(1, _toy_abstract())[1] == data_state
    checkpointer.close()


def test_restore_errors_name_the_directory_and_leaf(tmp_path):
    checkpointer = Checkpointer(tmp_path, _run_config(), keep=1, save_every=1)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/checkpoints: no complete checkpoint"):
        checkpointer.restore(None, _toy_abstract())
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/checkpoints: no complete checkpoint"):
        checkpointer.restore_config()
    checkpointer.save(1, _toy_state(1), {})
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 2; complete ones: \\[1\\]"):
        checkpointer.restore(2, _toy_abstract())
    unsharded = dict(_toy_abstract(), w=jax.ShapeDtypeStruct((4, 4), np.float32))
    with pytest.raises(ValueError, match="restore target \\['w'\\] has no sharding"):
        checkpointer.restore(1, unsharded)
    checkpointer.close()


_CHILD_PRELUDE = """
import os, signal, sys, time
import jax, ml_collections, numpy as np
from trainer.checkpointing import Checkpointer
workdir = sys.argv[1]
replicated = jax.sharding.NamedSharding(jax.make_mesh((1,), ("x",)), jax.sharding.PartitionSpec())
def state_of(step, shape):
    return {"w": jax.device_put(np.full(shape, step, np.float32), replicated),
            "step": jax.device_put(np.int32(step), replicated)}
checkpointer = Checkpointer(workdir, ml_collections.ConfigDict({"run": "child"}), keep=3, save_every=1)
"""

# Saves step 1 completely, then SIGKILLs itself while step 2 (large enough to take a while to
# write) is being written in the background.
_KILLED_MID_SAVE = (
    _CHILD_PRELUDE
    + """
checkpointer.save(1, state_of(1, (4, 4)), {"position": 1})
checkpointer.wait()
checkpointer.save(2, state_of(2, (16, 1024, 1024)), {"position": 2})
os.kill(os.getpid(), signal.SIGKILL)
"""
)

# A training loop that stops on SIGTERM: finishes the step, saves it, exits normally.
_PREEMPTED_LOOP = (
    _CHILD_PRELUDE
    + """
from trainer.preemption import PreemptionGuard
STEP_SECONDS, MAX_STEPS = 0.05, 100000
with PreemptionGuard() as guard:
    for step in range(1, MAX_STEPS):
        time.sleep(STEP_SECONDS)
        print(f"step {step}", flush=True)
        if guard.should_stop():
            checkpointer.save(step, state_of(step, (4, 4)), {"position": step}, force=True)
            checkpointer.wait()
            print(f"saved {step} after {guard.signal_name}", flush=True)
            break
checkpointer.close()
"""
)


def _child(code, workdir):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), str(workdir)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_incomplete_save_is_never_restored(tmp_path):
    child = _child(_KILLED_MID_SAVE, tmp_path)
    _, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL, stderr
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["1", "2" + TMP_SUFFIX], left
    checkpointer = Checkpointer(tmp_path, _run_config(), keep=3, save_every=1)
    assert checkpointer.all_steps() == [1]
    state, data_state = checkpointer.restore(None, _toy_abstract())
    assert int(state["step"]) == 1 and float(state["w"][0, 0]) == 1 and data_state == {"position": 1}
    assert checkpointer.save(2, _toy_state(2), {"position": 2}), "the interrupted step can be saved again"
    checkpointer.wait()
    assert checkpointer.all_steps() == [1, 2]
    checkpointer.close()


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
    child = _child(_PREEMPTED_LOOP, tmp_path)
    first = child.stdout.readline()
    assert first.startswith("step "), first + child.stderr.read()
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("saved ") and last.endswith(" after SIGTERM"), stdout
    step = int(last.split()[1])
    checkpointer = Checkpointer(tmp_path, _run_config(), keep=3, save_every=1)
    assert checkpointer.all_steps() == [step]
    state, data_state = checkpointer.restore(None, _toy_abstract())
    assert int(state["step"]) == step and data_state == {"position": step}
    assert json.loads(checkpointer.restore_config().to_json()) == {"run": "child"}
    checkpointer.close()


def test_preemption_guard_sets_the_flag_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop() and guard.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(keep=0), "checkpoint.keep must be a positive integer, got 0"),
        (dict(keep_best_mode="lowest"), "checkpoint.keep_best_mode must be one of \\('min', 'max'\\), got 'lowest'"),
        (dict(save_interval=5), "checkpoint config has no field 'save_interval'"),
        (dict(writer_nice=20), "checkpoint.writer_nice must be an integer in 0..19, got 20"),
    ],
)
def test_checkpoint_config_errors_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        checkpoint_config.get_config(**override)


def _nice(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


def test_async_saves_write_from_low_priority_threads(tmp_path):
    """With writer_nice=19 the threads Orbax starts for a save, and TensorStore's pool, run at nice 19
    while the caller's thread keeps its own; the save is complete and restores bit for bit."""
    import threading

    mesh, rules = _mesh_and_rules(**SAVE_AXES)
    abstract = abstract_train_state(_args(), mesh, rules, optax.adamw(1e-3))
    state = _random_state(abstract)
    config = _run_config()
    config.checkpoint.writer_nice = 19
    checkpointer = Checkpointer.from_config(tmp_path, config, config.checkpoint)
    main_nice = _nice(threading.get_native_id())
    before = set(threading.enumerate())  # threads earlier tests left (a tqdm monitor, ...) are not the save's
    assert checkpointer.save(3, state, DATA_STATE, force=True)
    writers = [t for t in threading.enumerate() if t not in before]
    alive = {t.name: _nice(t.native_id) for t in writers if t.is_alive()}
    pool = [
        int(tid)
        for tid in os.listdir("/proc/self/task")
        if open(f"/proc/self/task/{tid}/comm").read().strip() == "ts_pool_worker"
    ]
    checkpointer.wait()
    assert alive and set(alive.values()) == {19}, alive
    assert pool and {_nice(tid) for tid in pool if os.path.exists(f"/proc/self/task/{tid}")} == {19}
    assert _nice(threading.get_native_id()) == main_nice
    restored, data = checkpointer.restore(3, abstract)
    assert data == DATA_STATE
    _assert_same_state(restored, state, abstract)
    checkpointer.close()


def test_an_initial_checkpoint_may_lack_only_the_mtp_module_unless_allowed():
    mtp = ["params/mtp/0/block/attn/wq_a", "routing/mtp/0/block/moe/router/bias"]
    check_missing("ckpt", mtp)
    lacking = mtp + ["params/groups/2/blocks/attn/wq_a", "params/head"]
    with pytest.raises(
        ConfigError,
        match=r"^--init_checkpoint=ckpt lacks 2 weights besides the MTP module's: "
        r"params/groups/2/blocks/attn/wq_a, params/head; pass "
        r"--init_allow_missing=<path prefixes, e.g. params/groups/2/blocks/attn/>",
    ):
        check_missing("ckpt", lacking)
    with pytest.raises(ConfigError, match=r"lacks 1 weights besides the MTP module's: params/head;"):
        check_missing("ckpt", lacking, ["params/groups/2/"])
    check_missing("ckpt", lacking, ["params/groups/", "params/head"])
