"""One process of tests/test_multihost.py's fast checks, with no model to compile: it joins the run
(trainer/distributed.py flags), reads its rows of the tiny config's global batches through
GlobalBatches, and writes what every process sees, gathered: the global batches to
`--out/process_<id>.npz` and the data position to `--out/process_<id>.json`. With --wait_forever it
then runs a small collective every 0.1 s until a process dies.
"""
import json
import time
from pathlib import Path

from absl import app, flags

from trainer import distributed

_OUT = flags.DEFINE_string("out", None, "Directory for the gathered batches and data position.")
_BATCHES = flags.DEFINE_integer("batches", 2, "Global batches to read.")
_STREAMS = flags.DEFINE_integer("streams", 2, "data.streams")
_WAIT = flags.DEFINE_bool("wait_forever", False, "Afterwards, run collectives until a process dies.")


def main(argv):
    del argv
    from configs import tiny
    from mesh.presets import get_topology

    config = tiny.get_config()
    config.data.streams = _STREAMS.value
    distributed.initialize(distributed.from_flags(), get_topology(config.mesh.topology), emulate_devices=True)

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from trainer.batches import GlobalBatches
    from trainer.sharded_init import build_mesh
    from trainer.step import batch_sharding_of

    batches = GlobalBatches(config.data, batch_sharding_of(build_mesh(config.mesh), config.mesh.rules))
    seen = {}
    for i in range(_BATCHES.value):
        for key, array in next(batches).items():
            seen[f"{i}/{key}"] = np.asarray(multihost_utils.process_allgather(array, tiled=True))
    out = Path(_OUT.value)
    np.savez(out / f"process_{jax.process_index()}.npz", **seen)
    (out / f"process_{jax.process_index()}.json").write_text(json.dumps(batches.get_state()))
    while _WAIT.value:
        distributed.allgather_json(jax.process_index())
        time.sleep(0.1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    app.run(main)
