"""What an asynchronous checkpoint costs the training loop, and save/restore throughput; tiny config,
8 emulated devices, the trainer's own Checkpointer and jitted step.

    python bench/checkpoint.py [--repeats=3] [--window=10]

Prints one JSON object, for the configured priority of the writer threads
(`checkpoint.writer_nice`, trainer/io_priority.py) and, under `at_nice`, for it and for 0 (writers
competing with the step) measured in the same run:
- `async_save_overhead`: the mean step time over `window` steps that begin with a save call (its
  blocking part, the steps that run while the write goes on in the background, and any wait for the
  write to finish at the end) over the mean step time of `window` steps without a save, minus 1.
  `window` is a save interval; the target is under 0.05.
- `in_flight_step_overhead`: the mean time of the steps that start while a save is writing in the
  background (after the blocking call) over the mean step without a save, minus 1; `in_flight_steps`
  how many steps per save that was.
- `save_blocking_s`: how long `save` holds the loop (the device-to-host copy and the bookkeeping);
  `save_cost_s`: the loop time a save adds in all (blocking part and the slowdown of the steps the
  background write shares the machine with), so the overhead at any save interval is
  save_cost_s / (interval x step seconds).
- `save_mb_s` / `restore_mb_s`: train-state megabytes (1e6 bytes) per second for a whole save (call
  to write finished) and for a restore onto the same mesh (the resume path), nothing else running.
Each quantity is the median over `repeats`; windows with and without a save alternate so that the
machine's noise falls on both alike.
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

_REPEATS = flags.DEFINE_integer("repeats", 3, "Measurements of each kind (after one warm-up).")
_WINDOW = flags.DEFINE_integer("window", 10, "Steps per timed window: the save interval the overhead is spread over.")
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
    from trainer.checkpointing import Checkpointer, abstract_train_state
    from trainer.optimizer import build_optimizer, learning_rate_schedule
    from trainer.sharded_init import build_mesh
    from trainer.state import abstract_params, create_train_state
    from trainer.step import jit_train_step, make_train_step

    config = tiny.get_config()
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.seq_len)
    host_batch = {"tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
                  "loss_mask": np.ones(shape, np.int32), "segment_ids": np.ones(shape, np.int32),
                  "positions": np.broadcast_to(np.arange(config.seq_len, dtype=np.int32), shape).copy()}
    configured_nice = config.checkpoint.writer_nice
    with activate(mesh, rules):
        tx = build_optimizer(config.optimizer, abstract_params(args))
        graphdef, state, shardings = create_train_state(args, mesh, rules, tx, config.seed)
        step_fn, batch_sharding = jit_train_step(
            make_train_step(graphdef, tx, learning_rate_schedule(config.optimizer), config.train),
            shardings, mesh, rules)
        abstract = abstract_train_state(args, mesh, rules, tx)
        batch = {k: jax.device_put(v, batch_sharding) for k, v in host_batch.items()}
        state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / _MB

        def window(state, checkpointer, with_save: bool):
            """-> (state, seconds per step, seconds the save call blocked, times of in-flight steps)."""
            started = time.perf_counter()
            blocked, in_flight = 0.0, []
            if with_save:
                checkpointer.save(int(state.step), state, _DATA_STATE, force=True)
                blocked = time.perf_counter() - started
            for _ in range(_WINDOW.value):
                writing, step_started = with_save and checkpointer.saving(), time.perf_counter()
                state, _ = step_fn(state, batch)
                jax.block_until_ready(state)
                if writing:
                    in_flight.append(time.perf_counter() - step_started)
            checkpointer.wait()
            return state, (time.perf_counter() - started) / _WINDOW.value, blocked, in_flight

        def measure(state, nice: int):
            """The loop-side figures of saves whose writer threads run at `nice`."""
            checkpoint_config = config.checkpoint.copy_and_resolve_references()
            checkpoint_config.writer_nice = nice
            workdir = tempfile.mkdtemp(prefix="bench_checkpoint_")
            checkpointer = Checkpointer.from_config(workdir, config, checkpoint_config)
            state, _, _, _ = window(state, checkpointer, with_save=True)
            with_save, without_save, blocking, in_flight = [], [], [], []
            for _ in range(_REPEATS.value):
                state, seconds, blocked, flying = window(state, checkpointer, with_save=True)
                with_save.append(seconds)
                blocking.append(blocked)
                in_flight.extend(flying)
                state, seconds, _, _ = window(state, checkpointer, with_save=False)
                without_save.append(seconds)
            step_with, step_without = statistics.median(with_save), statistics.median(without_save)
            figures = {
                "async_save_overhead": step_with / step_without - 1,
                "in_flight_step_overhead": statistics.mean(in_flight) / step_without - 1 if in_flight else 0.0,
                "in_flight_steps": len(in_flight) / _REPEATS.value,
                "save_blocking_s": statistics.median(blocking), "save_cost_s": (step_with - step_without) * _WINDOW.value,
                "step_seconds": {"with_save": step_with, "without_save": step_without}}
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

    print(json.dumps({
        "config": "tiny", "devices": _DEVICES, "window_steps": _WINDOW.value, "repeats": _REPEATS.value,
        "writer_nice": configured_nice, **at_nice[configured_nice],
        "save_mb_s": state_mb / statistics.median(saves), "restore_mb_s": state_mb / statistics.median(restores),
        "state_mb": state_mb, "save_seconds": statistics.median(saves), "restore_seconds": statistics.median(restores),
        "at_nice": at_nice,
    }))


if __name__ == "__main__":
    app.run(main)
