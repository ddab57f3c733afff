"""One process of tests/test_multihost.py's fast checks, with no model to compile: it joins the run
(trainer/distributed.py flags, or a launcher's environment), reads its rows of the tiny config's
global batches through the trainer's batch source (SFT, or DPO pairs with stored reference
log-probabilities), and writes what every process sees, gathered: the global batches to
`--out/process_<id>.npz`, the data position and where it stands (process index and count, local
devices) to `--out/process_<id>.json`. With --wait_forever it
then runs a small collective every 0.1 s until a process dies or, with --stall_process, stops
joining them.
"""

import json
import time
from pathlib import Path

from absl import app, flags

from mesh.processes import allgather_json
from trainer import distributed

_OUT = flags.DEFINE_string("out", None, "Directory for the gathered batches and data position.")
_BATCHES = flags.DEFINE_integer("batches", 2, "Global batches to read.")
_STREAMS = flags.DEFINE_integer("streams", 2, "data.streams")
_PREFERENCES = flags.DEFINE_string(
    "preferences",
    None,
    "Read DPO batches from these pairs, which carry their reference log-probabilities (dpo.reference=data).",
)
_EMULATE = flags.DEFINE_bool("emulate", True, "Emulate this process's share of the topology's devices.")
_WAIT = flags.DEFINE_bool("wait_forever", False, "Afterwards, run collectives until a process dies.")
_STALL = flags.DEFINE_integer(
    "stall_process",
    None,
    "With --wait_forever: this process stops joining the collectives but stays alive (stuck in host code).",
)


def worker_config(streams: int, preferences: str | None):
    """The tiny config these checks read batches with (the one-process side builds the same)."""
    from configs import tiny

    config = tiny.get_config()
    config.data.streams = streams
    if preferences:
        config.objective, config.dpo.reference = "dpo", "data"
        config.data.preference_sources = ((preferences, 1.0),)
    return config


def main(argv):
    del argv
    from mesh.presets import get_topology

    config = worker_config(_STREAMS.value, _PREFERENCES.value)
    processes = distributed.from_flags()
    distributed.initialize(processes, get_topology(config.mesh.topology), emulate_devices=_EMULATE.value)

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from trainer.batch_source import build_batch_source
    from trainer.sharded_init import build_mesh
    from trainer.step import batch_sharding_of

    source = build_batch_source(config, batch_sharding_of(build_mesh(config.mesh), config.mesh.rules), graphdef=None)
    seen = {}
    for i in range(_BATCHES.value):
        for key, array in source.next(None).items():
            seen[f"{i}/{key}"] = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    out = Path(_OUT.value)
    np.savez(out / f"process_{jax.process_index()}.npz", **seen)
    (out / f"process_{jax.process_index()}.json").write_text(
        json.dumps(
            {
                "position": source.get_state(),
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "local_devices": jax.local_device_count(),
            }
        )
    )
    with distributed.collective_errors_named(processes):
        while _WAIT.value:
            if jax.process_index() == _STALL.value:
                time.sleep(3600)
            allgather_json(jax.process_index())
            time.sleep(0.1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    app.run(main)
