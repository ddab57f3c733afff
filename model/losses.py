"""Next-token and multi-token-prediction cross-entropy with a loss mask, the main and MTP heads read
through the shared head in one pass over vocabulary tiles (`ModelOutput.token_logprobs`).

Alignment, stated once: `loss_mask[i]` says token i is a target (e.g. an assistant token). The main
head at position i predicts token i+1; MTP depth k at position i predicts token i+k+1. A position is
scored only when its target exists inside the row, is masked in, and belongs to the same packed
document (segment) as the position.
"""

import jax
import jax.numpy as jnp

from model.transformer import ModelOutput


def ahead(a: jax.Array, shift: int, fill=0) -> jax.Array:
    """[b,s,...] -> [b,s,...] whose position i holds a's position i+shift (`fill` past the end): moves
    values that belong to a token onto the position that predicts it."""
    pad = [(0, 0), (0, shift)] + [(0, 0)] * (a.ndim - 2)
    return jnp.pad(a[:, shift:], pad, constant_values=fill)


def shifted_targets(tokens: jax.Array, loss_mask: jax.Array, shift: int, segment_ids=None):
    """tokens, loss_mask, segment_ids [b,s] -> (targets [b,s], weights [b,s] float32): the target of
    position i is token i+shift."""
    weights = ahead(loss_mask, shift).astype(jnp.float32)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    weights = weights * (ahead(segment_ids, shift, -1) == segment_ids)
    return ahead(tokens, shift), weights


def target_counts(tokens, loss_mask, segment_ids, num_mtp: int) -> jax.Array:
    """Scored targets of the main head and of each MTP depth: [1 + num_mtp] float32."""
    return jnp.stack(
        [jnp.sum(shifted_targets(tokens, loss_mask, shift, segment_ids)[1]) for shift in range(1, num_mtp + 2)]
    )


def language_model_loss(
    output: ModelOutput,
    tokens: jax.Array,
    loss_mask: jax.Array,
    mtp_weight: float | jax.Array,
    segment_ids=None,
    counts=None,
):
    """Mean next-token loss over scored targets, plus `mtp_weight` times the mean over depths of each
    depth's mean MTP loss.

    `counts` ([1 + depths], from `target_counts` over the whole global batch) makes the means global
    when this call sees one micro-batch: the micro-batch losses then add up to the global loss.
    Returns (loss, metrics) with metrics: main_loss, mtp_loss, target_tokens (this call's scored
    targets of the main head).
    """
    depths = output.head_inputs.shape[0] - 1
    if counts is None:
        counts = target_counts(tokens, loss_mask, segment_ids, depths)
    counts = jnp.maximum(counts, 1.0)
    shifted = [shifted_targets(tokens, loss_mask, shift, segment_ids) for shift in range(1, depths + 2)]
    targets = jnp.stack([target for target, _ in shifted])  # [1 + depths, b, s]
    weights = jnp.stack([weight for _, weight in shifted])
    totals = -jnp.sum(output.token_logprobs(targets) * weights, axis=(1, 2))  # one pass of the shared head
    main = totals[0] / counts[0]
    mtp = jnp.sum(totals[1:] / counts[1:]) / max(depths, 1)
    return main + mtp_weight * mtp, {"main_loss": main, "mtp_loss": mtp, "target_tokens": jnp.sum(weights[0])}
