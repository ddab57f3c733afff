"""On-policy distillation: the student's own samples, scored by a teacher of the same architecture.

At every scored completion position the loss is the reverse KL over the full vocabulary,
KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)), averaged over the global batch's
scored tokens. It is read over vocabulary tiles, teacher and student tile by tile
(`ModelOutput.reverse_kl`, model/vocab_head.py), so neither model's [tokens, vocab] logits exist.
"""

import dataclasses

import jax
import jax.numpy as jnp

from data.packing import BATCH_FIELDS
from objectives.protocol import NO_WEIGHTS
from objectives.sequence import scored_targets


@dataclasses.dataclass(frozen=True)
class Distill:
    bias_update_rate: float
    batch_keys = BATCH_FIELDS
    uses_frozen = True
    weight_schedules = NO_WEIGHTS

    def normalisers(self, batch: dict, num_mtp: int) -> jax.Array:
        return jnp.sum(scored_targets(batch)[1])

    def loss(self, output, batch: dict, teacher, tokens: jax.Array, step_weights: dict):
        _, weights = scored_targets(batch)
        kl = output.reverse_kl(jax.lax.stop_gradient(teacher))
        loss = jnp.sum(kl * weights) / jnp.maximum(tokens, 1.0)
        return loss, {"main_loss": loss, "reverse_kl": loss, "target_tokens": jnp.sum(weights)}
