"""Preemption: turn SIGTERM into a flag the training loop polls between steps.

A scheduler that reclaims the machines sends SIGTERM and waits a grace period before SIGKILL. Saving
from inside the signal handler would run Orbax in the middle of whatever the main thread was doing
(possibly a step with donated buffers), so the handler only records the signal; the loop finishes
its step, sees `should_stop()`, saves with `force=True`, waits for the write and exits 0.

    with PreemptionGuard() as guard:
        for step in ...:
            state = train_step(state, batch)
            if guard.should_stop():
                checkpointer.save(step, state, data_state, force=True); checkpointer.wait()
                break
"""

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class PreemptionGuard:
    """Context manager that installs the handler for `signals` and puts the previous ones back."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._signals = tuple(signals)
        self._received = threading.Event()
        self._signal_name = None
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self._signal_name = signal.Signals(signum).name
        self._received.set()
        logging.warning("received %s: the run will save after the current step and exit", self._signal_name)

    def __enter__(self):
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    @property
    def signal_name(self) -> str | None:
        """The name of the signal received in this process (None if none came)."""
        return self._signal_name

    def should_stop(self) -> bool:
        """True once any process of the run has received a signal.

        With several processes every one must call this at the same step: the signal may reach
        the hosts at different moments, and a host that starts saving (a collective write) while
        others start the next step would hang, so the flags are OR-ed across processes first.
        """
        local = self._received.is_set()
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))
