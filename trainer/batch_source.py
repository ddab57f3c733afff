"""Where each step's batch comes from, per objective, behind one interface the training loop uses,
`BatchSource`: `next(state) -> dict of arrays [B, S, ...]`, `get_state()` / `set_state()` (saved with
the checkpoint, so a resumed run sees the same batches), `metrics()` and `encoder`.

SFT and DPO read fixed data: global batches assembled from per-process streams (trainer/batches.py);
GRPO and distillation sample completions from the current policy every step, or read rollouts
(trainer/rollout_source.py, one process).
"""

import functools
from typing import Any, Protocol

import jax
import numpy as np

from data.encode import REFERENCE_LOGPS, Encoder
from data.packing import BATCH_FIELDS
from data.pipeline import build_encoder, preference_stream, read_preference_examples, read_sft_examples, sft_stream
from model.args import ModelArgs, from_config
from trainer.batches import GlobalBatches
from trainer.step import REPLAY_KEY


class BatchSource(Protocol):
    """The batches of a run, in order; `build_batch_source` picks the one of `config.objective`."""

    encoder: Encoder  # the tokenizer and chat template the batches were encoded with

    def next(self, state) -> dict:
        """The next global batch: arrays [B, S, ...] sharded by rows, keyed by the objective's
        `batch_keys`; `state` is the TrainState (sampled sources sample with its weights)."""

    def get_state(self) -> Any:
        """The position in the data, saved with every checkpoint."""

    def set_state(self, saved) -> None:
        """Resumes at a position `get_state` returned."""

    def metrics(self) -> dict:
        """Counts of what was read, kept and skipped (and the rollouts' rewards), for the metrics record."""


READ = {"sft": (read_sft_examples, sft_stream), "dpo": (read_preference_examples, preference_stream)}


def batch_fields(batch_keys: tuple, args: ModelArgs, seq_len: int) -> dict:
    """key -> (dims after the batch dim, numpy dtype) of each batch array an objective reads: what the
    sources below produce and what train.py --dry_run compiles the step for."""
    known = {
        **{key: ((seq_len,), np.int32) for key in BATCH_FIELDS},
        REFERENCE_LOGPS: ((2,), np.float32),
        "sampling_logprobs": ((seq_len,), np.float32),
        "advantages": ((seq_len,), np.float32),
        REPLAY_KEY: ((seq_len, args.num_layers, args.num_experts_per_tok), np.int32),
    }
    return {key: known[key] for key in batch_keys}


def build_batch_source(config, batch_sharding, *, graphdef) -> BatchSource:
    """The batch source of `config.objective`; `graphdef` is the model the sampled objectives sample from."""
    if config.objective == "dpo" and config.dpo.reference == "data":
        # The pairs' precomputed reference log-probabilities ride along as [B, 2] float32.
        return GlobalBatches(
            config.data,
            batch_sharding,
            read=functools.partial(read_preference_examples, with_reference=True),
            stream=preference_stream,
            fields=batch_fields(BATCH_FIELDS + (REFERENCE_LOGPS,), from_config(config.model), config.data.seq_len),
        )
    if config.objective in READ:
        read, stream = READ[config.objective]
        return GlobalBatches(config.data, batch_sharding, read=read, stream=stream)
    from trainer.rollout_source import build_rollout_source

    return build_rollout_source(
        config,
        process_count=jax.process_count(),
        graphdef=graphdef,
        batch_sharding=batch_sharding,
        encoder=build_encoder(config.data),
    )
