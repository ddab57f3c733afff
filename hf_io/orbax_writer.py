"""Writes model weights as one step of a checkpoint directory (configs/checkpoint_layout.py), leaf slice
by leaf slice, so no leaf (a stacked expert tensor can exceed host memory) is ever whole in memory.

The step holds the items `state` ({'params', 'routing'} nested by variable path, what
`Checkpointer.restore_weights` reads) and `config`. `state` is an Orbax PyTree item without OCDBT:
one zarr array per leaf, written with TensorStore, plus the `_METADATA` tree file Orbax reads. Chunks
are the target mesh's shards, cut to one layer and one expert, so every slice written covers whole
chunks and every device later reads only its own chunks.
"""

import json
import os
import time

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from configs.checkpoint_layout import CHECKPOINT_DIR, CONFIG, STATE
from hf_io.team import SOLO, Team
from hf_io.weights_layout import Leaf

ORBAX_TREE_METADATA = "_METADATA"
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
DICT_KEY = 2  # Orbax's key_type for a dict key
WRITE_CONCURRENCY = 16


def step_directory(root: str, step: int) -> str:
    """Where a Checkpointer rooted at workdir `root` keeps `step`."""
    return os.path.join(root, CHECKPOINT_DIR, str(step))


def _tree_metadata(leaves) -> dict:
    """The `_METADATA` file of a PyTree item whose leaves are jax.Arrays at these key paths."""
    tree = {
        str(leaf.keys): {
            "key_metadata": [{"key": key, "key_type": DICT_KEY} for key in leaf.keys],
            "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
        }
        for leaf in leaves
    }
    return {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def _step_metadata(started_ns: int) -> dict:
    """The step's `_CHECKPOINT_METADATA`: which Orbax handler reads each item, and when."""
    handler = lambda cls: f"{cls.__module__}.{cls.__qualname__}"
    return {
        "item_handlers": {STATE: handler(ocp.PyTreeCheckpointHandler), CONFIG: handler(ocp.JsonCheckpointHandler)},
        "metrics": {},
        "performance_metrics": {},
        "init_timestamp_nsecs": started_ns,
        "commit_timestamp_nsecs": time.time_ns(),
        "custom_metadata": {},
    }


def write_slice(array: ts.TensorStore, index: tuple, value: np.ndarray) -> ts.WriteFutures:
    """Starts writing `value` at `index` of `array` (the one place bytes leave; tests make it fail)."""
    return array[index].write(value)


class WeightsWriter:
    """Creates the arrays of `leaves` (Leaf -> (storage dtype, positional dims)) under the step
    directory, takes slices, and finishes the item files; `positional dims` are the leading dims
    written one index at a time (layers, experts), which get chunk extent 1.

    In a team, process 0 creates the arrays and writes the item files; every process writes slices."""

    def __init__(self, step_dir: str, leaves: dict, team: Team = SOLO):
        self.started_ns = time.time_ns()
        self.state_dir = os.path.join(step_dir, STATE)
        self.step_dir = step_dir
        self.team = team
        if team.is_lead:
            os.makedirs(self.state_dir)
        self.leaves = leaves
        self.arrays, self._pending = {}, []
        # No fsync per chunk file: the caller syncs once before publishing the directory.
        self._context = ts.Context({"file_io_sync": False})
        specs = {}
        for leaf, (dtype, positional) in leaves.items():
            chunks = (1,) * positional + leaf.shard_shape()[positional:]
            specs[leaf] = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": os.path.join(self.state_dir, leaf.name)},
                "metadata": {"shape": list(leaf.shape), "chunks": list(chunks), "compressor": None},
                "dtype": np.dtype(dtype).name,
                "store_data_equal_to_fill_value": True,
            }
        # Process 0 creates every array; the others open what it created (and check it matches).
        if team.is_lead:
            self._open(specs, create=True)
        team.barrier(f"{step_dir}: arrays created")
        if not team.is_lead:
            self._open(specs, open=True)

    def _open(self, specs: dict, **mode):
        for leaf, spec in specs.items():
            self.arrays[leaf.path] = ts.open(spec, context=self._context, **mode).result()

    def write(self, leaf: Leaf, index: tuple, value: np.ndarray, what: str):
        """Writes `value` (made from source tensor `what`) at `index` of `leaf`; at most
        WRITE_CONCURRENCY writes are in flight, and a failed one is reported by its `what`."""
        array = self.arrays[leaf.path]
        if tuple(value.shape) != tuple(array[index].shape):
            raise ValueError(
                f"{what}: laid out as {list(value.shape)}, {leaf.path}{list(index)} needs {list(array[index].shape)}"
            )
        future = write_slice(array, index, np.asarray(value, array.dtype.numpy_dtype))
        self._pending.append((future, f"{leaf.path}{list(index)} from {what}"))
        while len(self._pending) >= WRITE_CONCURRENCY:
            self._wait_oldest()

    def _wait_oldest(self):
        future, what = self._pending.pop(0)
        try:
            future.result()
        except Exception as error:
            raise OSError(f"{self.state_dir}: writing {what} failed: {error}") from error

    def flush(self):
        while self._pending:
            self._wait_oldest()

    def abandon(self):
        """Waits out the writes in flight, their errors ignored, so that a failed conversion's
        temporary directory can be removed without a write landing in it afterwards."""
        for future, _ in self._pending:
            try:
                future.result()
            except Exception:  # the conversion has already failed; its first error is the one reported
                pass
        self._pending.clear()

    def finish(self, config: dict):
        """Waits for this process's data, then (process 0) writes the files that make the step readable."""
        self.flush()
        if not self.team.is_lead:
            return
        with open(os.path.join(self.state_dir, ORBAX_TREE_METADATA), "w") as f:
            json.dump(_tree_metadata(self.leaves), f)
        config_dir = epath.Path(self.step_dir) / CONFIG
        config_dir.mkdir()
        ocp.JsonCheckpointHandler().save(config_dir, args=ocp.args.JsonSave(config))
        with open(os.path.join(self.step_dir, ORBAX_STEP_METADATA), "w") as f:
            json.dump(_step_metadata(self.started_ns), f)
