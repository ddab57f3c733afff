"""Where each step's batch comes from, per objective, behind one interface the training loop uses:
`next(state) -> dict of arrays [B, S, ...]`, `get_state()` / `set_state()` (saved with the
checkpoint, so a resumed run sees the same batches), `metrics()` and `encoder`.

SFT and DPO read fixed data: global batches assembled from per-process streams (trainer/batches.py);
GRPO and distillation sample completions from the current policy every step, or read rollouts
(trainer/rollout_source.py, one process).
"""
import jax

from data.pipeline import build_encoder, build_preference_pipeline, build_sft_pipeline
from trainer.batches import GlobalBatches

READ = {"sft": build_sft_pipeline, "dpo": build_preference_pipeline}


def build_batch_source(config, batch_sharding, *, graphdef):
    """The batch source of `config.objective`; `graphdef` is the model the sampled objectives sample from."""
    if config.objective in READ:
        return GlobalBatches(config.data, batch_sharding, build=READ[config.objective])
    from trainer.rollout_source import build_rollout_source
    return build_rollout_source(config, process_count=jax.process_count(), graphdef=graphdef,
                                batch_sharding=batch_sharding, encoder=build_encoder(config.data))
