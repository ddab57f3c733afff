"""Where each step's batch comes from, per objective, behind one interface the training loop uses:
`next(state) -> dict of arrays [B, S, ...]`, `get_state()` / `set_state()` (saved with the
checkpoint, so a resumed run sees the same batches), `metrics()` and `encoder`.

SFT and DPO read fixed data: global batches assembled from per-process streams (trainer/batches.py);
GRPO and distillation sample completions from the current policy every step, or read rollouts
(trainer/rollout_source.py, one process).
"""
import functools

import jax
import numpy as np

from data.encode import REFERENCE_LOGPS
from data.pipeline import build_encoder, build_preference_pipeline, build_sft_pipeline
from trainer.batches import TOKEN_FIELDS, GlobalBatches

READ = {"sft": build_sft_pipeline, "dpo": build_preference_pipeline}


def build_batch_source(config, batch_sharding, *, graphdef):
    """The batch source of `config.objective`; `graphdef` is the model the sampled objectives sample from."""
    if config.objective == "dpo" and config.dpo.reference == "data":
        # The pairs' precomputed reference log-probabilities ride along as [B, 2] float32.
        return GlobalBatches(config.data, batch_sharding,
                             build=functools.partial(build_preference_pipeline, with_reference=True),
                             fields={**TOKEN_FIELDS, REFERENCE_LOGPS: ((2,), np.float32)})
    if config.objective in READ:
        return GlobalBatches(config.data, batch_sharding, build=READ[config.objective])
    from trainer.rollout_source import build_rollout_source
    return build_rollout_source(config, process_count=jax.process_count(), graphdef=graphdef,
                                batch_sharding=batch_sharding, encoder=build_encoder(config.data))
