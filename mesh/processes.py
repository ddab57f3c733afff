"""Host values exchanged between the processes of one job, over JAX's multi-process collectives.

Used where every process must agree on a small JSON value: the data streams' positions and end
(trainer/batches.py) and the lead process's choices in a conversion (hf_io/team.py). Every process
must make the same calls in the same order; with one process nothing is exchanged.
"""

import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def allgather_json(value) -> list:
    """`value` (JSON data) of every process, in process order; every process must call this."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size]))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes)]
