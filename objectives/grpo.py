"""Group relative policy optimisation on completions of a sampling policy.

Each prompt has a group of G completions with rewards; a completion's advantage is its reward
normalised within its group (`data.rollouts.group_advantages`, on the host). Per scored completion token:

    ratio = exp(log p(token) - log p_sampling(token))
    loss  = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3
    k3    = exp(ref - logp) - (ref - logp) - 1          (reference model, unbiased KL estimate)

averaged over all completion tokens of the global batch (token-level, so long completions weigh
by their length). Batch arrays `sampling_logprobs` and `advantages` are aligned to tokens: entry i
belongs to token i (the prompt's entries are ignored).
"""

import dataclasses

import jax
import jax.numpy as jnp

from data.packing import BATCH_FIELDS
from model.losses import ahead
from objectives.protocol import NO_WEIGHTS
from objectives.sequence import scored_logprobs, scored_targets


def grpo_token_terms(
    logprobs, sampling_logprobs, advantages, reference_logprobs, clip_low: float, clip_high: float, kl_coef: float
):
    """Per-token arrays (any equal shapes) -> (loss, ratio, clipped (float: the clip bound was taken), k3)."""
    ratio = jnp.exp(logprobs - sampling_logprobs)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    surrogate = jnp.minimum(unclipped, clipped)
    log_ratio_ref = reference_logprobs - logprobs
    k3 = jnp.exp(log_ratio_ref) - log_ratio_ref - 1.0
    return -surrogate + kl_coef * k3, ratio, (clipped < unclipped).astype(jnp.float32), k3


@dataclasses.dataclass(frozen=True)
class GRPO:
    clip_low: float
    clip_high: float
    kl_coef: float
    bias_update_rate: float
    routing_replay: bool = False  # the batch carries the experts the sampling engine chose
    weight_schedules = NO_WEIGHTS

    @property
    def batch_keys(self) -> tuple:
        keys = BATCH_FIELDS + ("sampling_logprobs", "advantages")
        return keys + (("routed_experts",) if self.routing_replay else ())

    @property
    def uses_frozen(self) -> bool:
        return self.kl_coef > 0

    def normalisers(self, batch: dict, num_mtp: int) -> jax.Array:
        """Scored completion tokens in the whole batch (a scalar)."""
        return jnp.sum(scored_targets(batch)[1])

    def loss(self, output, batch: dict, reference, tokens: jax.Array, step_weights: dict):
        logprobs, weights = scored_logprobs(output, batch)
        sampling = ahead(batch["sampling_logprobs"], 1)
        advantages = ahead(batch["advantages"], 1)
        if reference is None:
            reference_logprobs = jax.lax.stop_gradient(logprobs)
        else:
            reference_logprobs = scored_logprobs(reference, batch)[0]
        per_token, ratio, clipped, k3 = grpo_token_terms(
            logprobs, sampling, advantages, reference_logprobs, self.clip_low, self.clip_high, self.kl_coef
        )
        mean = lambda x: jnp.sum(x * weights) / jnp.maximum(tokens, 1.0)
        loss = mean(per_token)
        return loss, {
            "main_loss": loss,
            "grpo_ratio": mean(ratio),
            "grpo_clipped": mean(clipped),
            "grpo_kl": mean(k3),
            "grpo_advantage": mean(advantages),
            "target_tokens": jnp.sum(weights),
        }
