"""Next-token and multi-token-prediction cross-entropy with a loss mask.

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


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [b,s,vocab], targets [b,s] -> log p(target) [b,s] float32. The target logit is read by a
    one-hot contraction, not a gather, so a vocab-sharded logits tensor is never gathered whole."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.sum(logits * jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype), axis=-1)
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """-> (sum of weighted token losses, sum of weights), float32."""
    return -jnp.sum(token_logprobs(logits, targets) * weights), jnp.sum(weights)


def target_counts(tokens, loss_mask, segment_ids, num_mtp: int) -> jax.Array:
    """Scored targets of the main head and of each MTP depth: [1 + num_mtp] float32."""
    return jnp.stack([jnp.sum(shifted_targets(tokens, loss_mask, shift, segment_ids)[1])
                      for shift in range(1, num_mtp + 2)])


def language_model_loss(output: ModelOutput, tokens: jax.Array, loss_mask: jax.Array, mtp_weight: float,
                        segment_ids=None, counts=None):
    """Mean next-token loss over scored targets, plus `mtp_weight` times the mean over depths of each
    depth's mean MTP loss.

    `counts` ([1 + depths], from `target_counts` over the whole global batch) makes the means global
    when this call sees one micro-batch: the micro-batch losses then add up to the global loss.
    Returns (loss, metrics) with metrics: main_loss, mtp_loss, target_tokens (this call's scored
    targets of the main head).
    """
    depths = len(output.mtp_logits)
    if counts is None:
        counts = target_counts(tokens, loss_mask, segment_ids, depths)
    counts = jnp.maximum(counts, 1.0)
    total, scored = cross_entropy(output.logits, *shifted_targets(tokens, loss_mask, 1, segment_ids))
    main = total / counts[0]
    mtp = jnp.zeros((), jnp.float32)
    for depth, logits in enumerate(output.mtp_logits, start=1):
        mtp_total, _ = cross_entropy(logits, *shifted_targets(tokens, loss_mask, depth + 1, segment_ids))
        mtp = mtp + mtp_total / counts[depth] / depths
    return main + mtp_weight * mtp, {"main_loss": main, "mtp_loss": mtp, "target_tokens": scored}
