"""On-policy distillation: the student's own samples, scored by a teacher of the same architecture.

At every scored completion position the loss is the reverse KL over the full vocabulary,
KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v)), averaged over the global batch's
scored tokens. Both log-softmaxes and the sum over v are reductions over the vocab axis, so
vocab-sharded logits are never gathered on one device.
"""
import dataclasses

import jax
import jax.numpy as jnp

from objectives.sequence import BATCH_FIELDS, scored_targets


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """[..., vocab] x2 -> KL(student || teacher) [...], float32."""
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(student) * (student - teacher), axis=-1)


@dataclasses.dataclass(frozen=True)
class Distill:
    bias_update_rate: float
    batch_keys = BATCH_FIELDS
    uses_frozen = True

    def normalisers(self, batch: dict, num_mtp: int) -> jax.Array:
        return jnp.sum(scored_targets(batch)[1])

    def loss(self, output, batch: dict, teacher, tokens: jax.Array):
        _, weights = scored_targets(batch)
        kl = reverse_kl(output.logits, jax.lax.stop_gradient(teacher.logits))
        loss = jnp.sum(kl * weights) / jnp.maximum(tokens, 1.0)
        return loss, {"main_loss": loss, "reverse_kl": loss, "target_tokens": jnp.sum(weights)}
