"""The DPO reference's log-probabilities of preference pairs, computed once and stored with them
(`config.dpo.reference=data`), so DPO trains without running the reference; score_preferences.py is
its command line.

Every record of `config.data.preference_sources` is read in file order and encoded as DPO training
encodes it (chat template, seq_len: a pair that does not fit is left out and counted, as training
drops it); the reference runs on the configured mesh, and each record is written with its replies'
summed log-probabilities added as `ref_chosen_logps` / `ref_rejected_logps`. The reference is what
DPO would use in the step: the weights of an Orbax checkpoint, or the seed's initialisation. The
output file appears only when complete.
"""
import json
import os

import jax
import numpy as np
from flax import nnx

from data import packing
from data.encode import encode_preference, preference_sequences, reject
from data.errors import InvalidRecord, LoadStats
from data.formats import parse_preference
from data.jsonl import read_records
from data.pipeline import build_encoder
from mesh.sharding import activate
from model.args import from_config
from objectives.dpo import pair_logprobs
from trainer.checkpointing import Checkpointer, abstract_like
from trainer.sharded_init import build_mesh, init_sharded
from trainer.state import split_variables
from trainer.step import batch_sharding_of


def _pairs(config, encoder, stats):
    """(raw record, batch row) of every pair that fits, in source then file order."""
    pad_id = encoder.tokenizer.token_id(encoder.template.pad)
    for pattern, _ in config.preference_sources:
        for located in read_records(pattern, lambda value: (value, parse_preference(value)),
                                    skip_bad=config.skip_bad_records, stats=stats):
            raw, pair = located.record
            try:
                encoded = encode_preference(pair, encoder)
                for key in ("prompt", "chosen", "rejected"):
                    encoder.check_vocab(encoded[key])
            except InvalidRecord as error:
                reject(located, error, skip_bad=config.skip_bad_records, stats=stats)
                continue
            row = packing.pair_row(preference_sequences(encoded), config.seq_len, pad_id)
            if row is None:
                stats.dropped_too_long += 1
                continue
            yield raw, row


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
                None, abstract, fallback=weights)
            log(f"reference weights from {init_checkpoint}")
        batch_sharding = batch_sharding_of(mesh, rules)

        @jax.jit
        def reference_logps(weights, batch):
            model = nnx.merge(graphdef, weights["params"], weights["routing"])
            logits = model(batch["tokens"], batch["positions"], batch["segment_ids"]).logits
            return pair_logprobs(logits, batch)[0]

        def flush(raws, rows, out):
            padded = rows + [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (rows_per_batch - len(rows))
            batch = {k: jax.device_put(np.stack([r[k] for r in padded]), batch_sharding) for k in rows[0]}
            sums = np.asarray(reference_logps(weights, batch))
            for raw, (chosen, rejected) in zip(raws, sums[:len(rows)]):
                out.write(json.dumps({**raw, "ref_chosen_logps": float(chosen),
                                      "ref_rejected_logps": float(rejected)}) + "\n")

        encoder = build_encoder(config.data)
        partial = f"{output}.partial"
        scored = 0
        try:
            with open(partial, "w") as out:
                raws, rows = [], []
                for raw, row in _pairs(config.data, encoder, stats):
                    raws.append(raw)
                    rows.append(row)
                    if len(rows) == rows_per_batch:
                        flush(raws, rows, out)
                        scored, raws, rows = scored + len(rows), [], []
                if rows:
                    flush(raws, rows, out)
                    scored += len(rows)
            os.replace(partial, output)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    result = {"scored": scored, "dropped_too_long": stats.dropped_too_long, "skipped": sum(stats.skipped.values())}
    log(f"wrote {output}: {result}")
    return result
