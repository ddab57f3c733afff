"""trainer/io_priority.py: calls run on one thread of the given nice value, threads they start
inherit it, TensorStore's pool is lowered by name, errors come back to the caller."""

import os
import threading

import numpy as np
import pytest
import tensorstore as ts

from trainer.io_priority import TENSORSTORE_POOL, BackgroundWriter, lower_tensorstore_pool


def _nice(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


def _started_thread_nice() -> tuple[int, int]:
    """(nice of the calling thread, nice of a thread it starts)."""
    seen = {}
    child = threading.Thread(target=lambda: seen.setdefault("child", _nice(threading.get_native_id())))
    child.start()
    child.join()
    return _nice(threading.get_native_id()), seen["child"]


def test_runs_on_a_low_priority_thread_whose_children_inherit_it():
    writer = BackgroundWriter(19)
    caller = _nice(threading.get_native_id())
    assert writer.run(_started_thread_nice) == (19, 19)
    assert _nice(threading.get_native_id()) == caller
    writer.close()


def test_nice_zero_runs_on_the_callers_thread():
    writer = BackgroundWriter(0)
    assert writer.run(threading.get_native_id) == threading.get_native_id()


def test_errors_reach_the_caller():
    writer = BackgroundWriter(19)
    with pytest.raises(ZeroDivisionError):
        writer.run(lambda: 1 / 0)
    assert writer.run(lambda: 2) == 2
    writer.close()


def test_tensorstore_pool_is_lowered_by_name(tmp_path):
    array = ts.open(
        {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(tmp_path / "a")},
            "metadata": {"shape": [64], "chunks": [8]},
            "dtype": "float32",
        },
        create=True,
    ).result()
    array.write(np.arange(64, dtype=np.float32)).result()
    pool = [
        int(t)
        for t in os.listdir("/proc/self/task")
        if open(f"/proc/self/task/{t}/comm").read().strip() == TENSORSTORE_POOL
    ]
    assert pool
    lower_tensorstore_pool(7)
    assert {_nice(t) for t in pool if os.path.exists(f"/proc/self/task/{t}")} <= {7, 19}


def test_nice_values_outside_the_range_are_refused():
    with pytest.raises(ValueError, match="nice value 20 outside 0..19"):
        BackgroundWriter(20)
