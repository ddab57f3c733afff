"""The directory layout of a checkpoint, shared by the trainer (trainer/checkpointing.py writes and
restores whole runs) and the converter (hf_io/orbax_writer.py, hf_io/orbax_reader.py write and read
the weights alone), so neither package imports the other.

`<workdir>/checkpoints/<step>/{state,data,config}`: `state` the train state as nested plain arrays,
`data` the data-iterator position, `config` the run config as JSON (`config_to_json`). A weights-only
step (an import) has `state` and `config`.
"""

import json

import ml_collections

CHECKPOINT_DIR = "checkpoints"
STATE, DATA, CONFIG = "state", "data", "config"


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON data (tuples become lists), as it is stored with every checkpoint."""
    return json.loads(config.to_json_best_effort())
