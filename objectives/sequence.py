"""Per-token and per-sequence log-probabilities of the tokens a batch scores, read from the model's
head over vocabulary tiles (`ModelOutput.token_logprobs`: no [tokens, vocab] logits).

Alignment follows model/losses.py: position i predicts token i+1, and a position counts when its
target is in the loss mask and in the same packed segment. Arrays that belong to a token (sampling
log-probs, advantages) are moved onto the position that predicts it with `model.losses.ahead`.
"""

import jax
import jax.numpy as jnp

from model.losses import shifted_targets
from model.transformer import ModelOutput


def scored_targets(batch: dict):
    """-> (target of position i = token i+1 [b,s], weights [b,s] float32: 1 where that target is scored)."""
    return shifted_targets(batch["tokens"], batch["loss_mask"], 1, batch["segment_ids"])


def scored_logprobs(output: ModelOutput, batch: dict):
    """-> (log p(token i+1) at position i [b,s] from the main head, weights [b,s] as `scored_targets`)."""
    targets, weights = scored_targets(batch)
    return output.token_logprobs(targets[None])[0], weights


def segment_sums(values: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """values, segment_ids [b,s] -> [b, num_segments]: column k sums the values of segment k+1 of each
    row (a one-hot contraction: rows stay where they are sharded)."""
    one_hot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.float32)  # segment 0 (padding) -> zeros
    return jnp.einsum("bs,bsk->bk", values.astype(jnp.float32), one_hot)
