"""Next-token and multi-token-prediction cross-entropy with a loss mask.

Alignment, stated once: `loss_mask[i]` says token i is a target (e.g. an assistant token). The main
head at position i predicts token i+1; MTP depth k at position i predicts token i+k+1. A position is
scored only when its target exists inside the row, is masked in, and belongs to the same packed
document (segment) as the position.
"""
import jax
import jax.numpy as jnp

from model.transformer import ModelOutput


def shifted_targets(tokens: jax.Array, loss_mask: jax.Array, shift: int, segment_ids=None):
    """tokens, loss_mask, segment_ids [b,s] -> (targets [b,s], weights [b,s] float32): the target of
    position i is token i+shift."""
    ahead = lambda a, fill=0: jnp.pad(a[:, shift:], ((0, 0), (0, shift)), constant_values=fill)
    weights = ahead(loss_mask).astype(jnp.float32)
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    weights = weights * (ahead(segment_ids, -1) == segment_ids)
    return ahead(tokens), weights


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array):
    """-> (sum of weighted token losses, sum of weights), float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_loss * weights), jnp.sum(weights)


def language_model_loss(output: ModelOutput, tokens: jax.Array, loss_mask: jax.Array, mtp_weight: float,
                        segment_ids=None):
    """Mean next-token loss over masked-in targets, plus `mtp_weight` times the mean MTP loss per depth.

    Returns (loss, metrics) with metrics: main_loss, mtp_loss (mean over depths), target_tokens.
    """
    total, count = cross_entropy(output.logits, *shifted_targets(tokens, loss_mask, 1, segment_ids))
    main = total / jnp.maximum(count, 1.0)
    mtp_losses = []
    for depth, logits in enumerate(output.mtp_logits, start=1):
        mtp_total, mtp_count = cross_entropy(logits, *shifted_targets(tokens, loss_mask, depth + 1, segment_ids))
        mtp_losses.append(mtp_total / jnp.maximum(mtp_count, 1.0))
    mtp = jnp.mean(jnp.stack(mtp_losses)) if mtp_losses else jnp.zeros((), jnp.float32)
    return main + mtp_weight * mtp, {"main_loss": main, "mtp_loss": mtp, "target_tokens": count}
