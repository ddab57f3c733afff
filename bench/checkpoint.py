"""What an asynchronous checkpoint costs the training loop, and save/restore throughput; tiny config,
8 emulated devices, the trainer's own Checkpointer and jitted step.

    python bench/checkpoint.py [--repeats=5] [--window=10]

Each measurement is a save interval of `window` steps whose first step follows a save call. The
steps of the interval that start after the background write has finished are the baseline: they
run in the same minute as the ones the write overlapped, so the drift of a shared machine's speed
(steps here wander between 1.5 and 2.3 s over tens of seconds) falls on both alike. Prints one JSON
object, for the configured priority of the writer threads (`checkpoint.writer_nice`,
trainer/io_priority.py) and, under `at_nice`, for it and for 0 (writers competing with the step):
- `save_cost_s`: the loop time a save adds: its blocking part (the device-to-host copy and the
  bookkeeping), the excess over the baseline of the steps that start while the write goes on in the
  background, and any wait for the write at the end of the interval.
- `async_save_overhead`: save_cost_s over the interval's baseline time (window x baseline step): the
  fraction of step time a save costs at that save interval (at any other: save_cost_s / (interval x
  step seconds)). The target is under 0.05.
- `in_flight_step_overhead`: the mean time of the steps that start while a save is writing over the
  baseline step, minus 1; `in_flight_steps` how many steps per save that was; `save_blocking_s`.
- `save_mb_s` / `restore_mb_s`: train-state megabytes (1e6 bytes) per second for a whole save (call
  to write finished) and for a restore onto the same mesh (the resume path), nothing else running.
Each quantity is the median over `repeats` intervals (in_flight_step_overhead: over all in-flight
steps, relative to their own interval's baseline).
"""

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_REPEATS = flags.DEFINE_integer("repeats", 5, "Measurements of each kind (after one warm-up).")
_WINDOW = flags.DEFINE_integer("window", 10, "Steps per measured save interval (the first follows the save call).")
_DEVICES = 8
_MB = 1e6
_DATA_STATE = {"position": 0}


def main(argv):
    del argv
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES)
    import numpy as np

    from configs import tiny
    from mesh.sharding import activate
    from model.args import from_config
    from objectives import build_objective
    from trainer.checkpointing import Checkpointer, abstract_train_state
    from trainer.optimizer import run_optimizer
    from trainer.sharded_init import build_mesh
    from trainer.state import create_train_state
    from trainer.step import jit_train_step, make_train_step

    config = tiny.get_config()
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    rng = np.random.default_rng(0)
    shape = (config.data.global_batch_size, config.data.seq_len)
    host_batch = {
        "tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
        "loss_mask": np.ones(shape, np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(config.data.seq_len, dtype=np.int32), shape).copy(),
    }
    configured_nice = config.checkpoint.writer_nice
    with activate(mesh, rules):
        tx, schedule = run_optimizer(config, args)
        graphdef, state, shardings = create_train_state(args, mesh, rules, tx, config.seed)
        step_fn, batch_sharding = jit_train_step(
            make_train_step(graphdef, tx, schedule, config.train, build_objective(config)),
            shardings,
            mesh,
            rules,
        )
        abstract = abstract_train_state(args, mesh, rules, tx)
        batch = {k: jax.device_put(v, batch_sharding) for k, v in host_batch.items()}
        state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / _MB

        def interval(state, checkpointer):
            """-> (state, {blocked, in-flight step seconds, baseline step seconds, end wait})."""
            started = time.perf_counter()
            checkpointer.save(int(state.step), state, _DATA_STATE, force=True)
            blocked, in_flight, baseline = time.perf_counter() - started, [], []
            for _ in range(_WINDOW.value):
                writing, step_started = checkpointer.saving(), time.perf_counter()
                state, _ = step_fn(state, batch)
                jax.block_until_ready(state)
                (in_flight if writing else baseline).append(time.perf_counter() - step_started)
            started = time.perf_counter()
            checkpointer.wait()
            return state, dict(
                blocked=blocked, in_flight=in_flight, baseline=baseline, waited=time.perf_counter() - started
            )

        def measure(state, nice: int):
            """The loop-side figures of saves whose writer threads run at `nice`."""
            checkpoint_config = config.checkpoint.copy_and_resolve_references()
            checkpoint_config.writer_nice = nice
            workdir = tempfile.mkdtemp(prefix="bench_checkpoint_")
            checkpointer = Checkpointer.from_config(workdir, config, checkpoint_config)
            state, _ = interval(state, checkpointer)
            costs, overheads, excess, flying, blocking, base_steps = [], [], [], 0, [], []
            for _ in range(_REPEATS.value):
                state, one = interval(state, checkpointer)
                if not one["baseline"]:
                    raise SystemExit(f"a save outlasted the {_WINDOW.value}-step interval; raise --window")
                base = statistics.mean(one["baseline"])
                cost = one["blocked"] + sum(t - base for t in one["in_flight"]) + one["waited"]
                costs.append(cost)
                overheads.append(cost / (_WINDOW.value * base))
                excess.extend(t / base - 1 for t in one["in_flight"])
                flying += len(one["in_flight"])
                blocking.append(one["blocked"])
                base_steps.append(base)
            figures = {
                "async_save_overhead": statistics.median(overheads),
                "in_flight_step_overhead": statistics.mean(excess) if excess else 0.0,
                "in_flight_steps": flying / _REPEATS.value,
                "save_blocking_s": statistics.median(blocking),
                "save_cost_s": statistics.median(costs),
                "baseline_step_seconds": statistics.median(base_steps),
            }
            return state, checkpointer, workdir, figures

        def whole_save(state, checkpointer):
            started = time.perf_counter()
            checkpointer.save(int(state.step), state, _DATA_STATE, force=True)
            checkpointer.wait()
            return time.perf_counter() - started

        def restore(checkpointer, step):
            started = time.perf_counter()
            jax.block_until_ready(checkpointer.restore(step, abstract)[0])
            return time.perf_counter() - started

        state, _ = step_fn(state, batch)
        at_nice = {}
        for nice in sorted({0, configured_nice}, reverse=True):
            state, checkpointer, workdir, at_nice[nice] = measure(state, nice)
            if nice == configured_nice:
                saves, restores = [], []
                for _ in range(_REPEATS.value):
                    state, _ = step_fn(state, batch)
                    saves.append(whole_save(jax.block_until_ready(state), checkpointer))
                    restores.append(restore(checkpointer, int(state.step)))
            checkpointer.close()
            shutil.rmtree(workdir)

    print(
        json.dumps(
            {
                "config": "tiny",
                "devices": _DEVICES,
                "window_steps": _WINDOW.value,
                "repeats": _REPEATS.value,
                "writer_nice": configured_nice,
                **at_nice[configured_nice],
                "save_mb_s": state_mb / statistics.median(saves),
                "restore_mb_s": state_mb / statistics.median(restores),
                "state_mb": state_mb,
                "save_seconds": statistics.median(saves),
                "restore_seconds": statistics.median(restores),
                "at_nice": at_nice,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
