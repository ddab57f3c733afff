"""The DPO reference's log-probabilities of preference pairs, computed once and stored with them
(`config.dpo.reference=data`), so DPO trains without running the reference; score_preferences.py is
its command line.

Every record of `config.data.preference_sources` is read in file order and encoded as DPO training
encodes it (chat template, seq_len: a pair that does not fit is left out and counted, as training
drops it); the reference runs on the configured mesh, and each record is written with its replies'
summed log-probabilities added as `ref_chosen_logps` / `ref_rejected_logps`. The reference is what
DPO would use in the step: the weights of an Orbax checkpoint, or the seed's initialisation. The
output file appears only when complete. It sits beside its command line, not in objectives/ or
trainer/, because it joins the DPO objective's pair log-probabilities with the trainer's checkpoints
and mesh, and neither package imports the other (tests/test_imports.py).
"""

import glob
import itertools
import json
import os

import jax
import numpy as np
from flax import nnx

from configs.release import ConfigError
from data.errors import LoadStats
from data.pipeline import build_encoder, preference_rows
from mesh.sharding import activate
from model.args import from_config
from model.params import split_variables
from objectives.dpo import pair_logprobs
from trainer.checkpointing import Checkpointer, abstract_like
from trainer.sharded_init import build_mesh, init_sharded
from trainer.step import batch_sharding_of


def check_output(output: str, config, overwrite: bool) -> None:
    """Refuses (ConfigError naming the flag) an output that is one of the input files, or that exists
    when `overwrite` is off: the scored file replaces the output only when complete, and pairs the
    scoring skips (too long, bad) would be lost from an input written over."""
    inputs = [path for pattern, _ in config.data.preference_sources for path in glob.glob(pattern)]
    if any(os.path.realpath(path) == os.path.realpath(output) for path in inputs):
        raise ConfigError(
            f"--output={output} is one of the input files (config.data.preference_sources): "
            "write the scored pairs to another file"
        )
    if os.path.exists(output) and not overwrite:
        raise ConfigError(f"--output={output} exists: pass --overwrite to replace it")


def score_pairs(config, init_checkpoint: str | None, output: str, log=print) -> dict:
    """Writes `output` (see the module docstring); returns {"scored": pairs written, "dropped_too_long",
    "skipped": bad records skipped}. JAX must already see the mesh's devices."""
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    rows_per_batch = config.data.global_batch_size
    stats = LoadStats()
    with activate(mesh, rules):
        graphdef, state, shardings = init_sharded(args, mesh, rules, config.seed)
        (params, routing), (param_shardings, routing_shardings) = split_variables(state), split_variables(shardings)
        weights = {"params": params, "routing": routing}
        if init_checkpoint:
            abstract = abstract_like(weights, {"params": param_shardings, "routing": routing_shardings})
            weights, _ = Checkpointer(init_checkpoint, config, keep=1, save_every=1).restore_weights(
                None, abstract, fallback=weights
            )
            log(f"reference weights from {init_checkpoint}")
        batch_sharding = batch_sharding_of(mesh, rules)

        @jax.jit
        def reference_logps(weights, batch):
            model = nnx.merge(graphdef, weights["params"], weights["routing"])
            output = model(batch["tokens"], batch["positions"], batch["segment_ids"], logits=False)
            return pair_logprobs(output, batch)[0]

        def write(scored, out):
            """Scores one batch of (record, row) and writes the records with their reference log-probs."""
            rows = [row for _, row in scored]
            padded = rows + [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (rows_per_batch - len(rows))
            batch = {k: jax.device_put(np.stack([r[k] for r in padded]), batch_sharding) for k in rows[0]}
            sums = np.asarray(reference_logps(weights, batch))
            for (raw, _), (chosen, rejected) in zip(scored, sums):
                out.write(
                    json.dumps({**raw, "ref_chosen_logps": float(chosen), "ref_rejected_logps": float(rejected)}) + "\n"
                )

        encoder = build_encoder(config.data)
        pairs = itertools.chain.from_iterable(
            preference_rows(pattern, encoder, config.data, stats) for pattern, _ in config.data.preference_sources
        )
        partial, written = f"{output}.partial", 0
        try:
            with open(partial, "w") as out:
                while batch_pairs := list(itertools.islice(pairs, rows_per_batch)):
                    write(batch_pairs, out)
                    written += len(batch_pairs)
            os.replace(partial, output)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    result = {"scored": written, "dropped_too_long": stats.dropped_too_long, "skipped": sum(stats.skipped.values())}
    log(f"wrote {output}: {result}")
    return result
