"""Checkpoint writes on the CPU time the step leaves over.

An async save serialises and writes from background threads (Orbax's and TensorStore's pool), which
compete with a step that keeps the host's cores busy; run at the lowest priority they yield the CPU to
the step (bench/checkpoint.py measures both priorities; figures in docs/benchmarks.md). Linux keeps a
nice value per thread and new threads inherit it, so saves start from one low-priority thread;
TensorStore's pool threads outlive a save and are lowered by name each time. Elsewhere (no per-thread
priorities) the saves run as before. Design notes: docs/training.md.
"""

import concurrent.futures
import os
import threading

TASKS = "/proc/self/task"
TENSORSTORE_POOL = "ts_pool_worker"  # TensorStore's worker threads, as the kernel names them
MAX_NICE = 19


def _per_thread_priorities() -> bool:
    return hasattr(os, "setpriority") and os.path.isdir(TASKS)


def _lower(thread_id: int, nice: int) -> None:
    """Raises `thread_id`'s nice value to `nice` (never lowers it: that needs privileges)."""
    try:
        if os.getpriority(os.PRIO_PROCESS, thread_id) < nice:
            os.setpriority(os.PRIO_PROCESS, thread_id, nice)
    except (ProcessLookupError, PermissionError):
        pass  # the thread ended meanwhile, or is not ours to change


def lower_tensorstore_pool(nice: int) -> None:
    for name in os.listdir(TASKS):
        try:
            with open(os.path.join(TASKS, name, "comm")) as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == TENSORSTORE_POOL:
            _lower(int(name), nice)


class BackgroundWriter:
    """Runs the calls given to `run` on one thread of nice value `nice` (0: on the caller's thread)."""

    def __init__(self, nice: int):
        if not 0 <= nice <= MAX_NICE:
            raise ValueError(f"nice value {nice} outside 0..{MAX_NICE}")
        self.nice = nice if _per_thread_priorities() else 0
        self._executor = None
        if self.nice:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="checkpoint_writer",
                initializer=lambda: _lower(threading.get_native_id(), self.nice),
            )

    def run(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the writer thread; returns its result (or raises its error)."""
        if self._executor is None:
            return fn(*args, **kwargs)
        lower_tensorstore_pool(self.nice)
        return self._executor.submit(fn, *args, **kwargs).result()

    def close(self):
        if self._executor is not None:
            self._executor.shutdown()
