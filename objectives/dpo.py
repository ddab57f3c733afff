"""Direct preference optimisation (sigmoid loss) against a frozen reference model.

A preference row holds one pair: the chosen sequence (prompt + chosen reply) as segment 1 and the
rejected one as segment 2, replies in the loss mask (data.pipeline.build_preference_pipeline, data.packing.pair_row). A
row counts as a pair only when both replies have a scored token.

    loss = -mean over pairs of log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))

with pi / ref the summed reply log-probabilities under the policy / the reference. The reference is
either run in the step (`reference="model"`: the frozen initial weights, on the same mesh) or read
from the batch (`reference="data"`: `reference_logps` [b, 2], precomputed by score_preferences.py
and stored with the pairs), which spares its forward pass and its copy of the weights.
"""

import dataclasses

import jax
import jax.numpy as jnp

from data.encode import REFERENCE_LOGPS
from data.packing import BATCH_FIELDS
from objectives.protocol import NO_WEIGHTS
from objectives.sequence import scored_logprobs, scored_targets, segment_sums

SIDES = 2  # chosen = segment 1, rejected = segment 2
REFERENCES = ("model", "data")


def valid_pairs(weights: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """weights [b,s] (scored positions) -> [b] float32: 1 where both replies have a scored token."""
    scored = segment_sums(weights, segment_ids, SIDES)
    return jnp.all(scored > 0, axis=-1).astype(jnp.float32)


def pair_logprobs(output, batch: dict):
    """ModelOutput -> (summed reply log-probs [b, 2] (chosen, rejected), valid [b] as `valid_pairs`)."""
    logprobs, weights = scored_logprobs(output, batch)
    sums = segment_sums(logprobs * weights, batch["segment_ids"], SIDES)
    return sums, valid_pairs(weights, batch["segment_ids"])


def dpo_terms(policy: jax.Array, reference: jax.Array, beta: float):
    """policy, reference [pairs, 2] -> (loss per pair, implicit reward margin per pair), float32."""
    margin = beta * ((policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1]))
    return -jax.nn.log_sigmoid(margin), margin


@dataclasses.dataclass(frozen=True)
class DPO:
    beta: float
    bias_update_rate: float
    reference: str = "model"  # one of REFERENCES
    weight_schedules = NO_WEIGHTS

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"config.dpo.reference={self.reference!r} is not one of {REFERENCES}")

    @property
    def uses_frozen(self) -> bool:
        return self.reference == "model"

    @property
    def batch_keys(self) -> tuple:
        return BATCH_FIELDS + ((REFERENCE_LOGPS,) if self.reference == "data" else ())

    def normalisers(self, batch: dict, num_mtp: int) -> jax.Array:
        """Pairs in the whole batch (a scalar), so micro-batch losses add up to the batch mean."""
        return jnp.sum(valid_pairs(scored_targets(batch)[1], batch["segment_ids"]))

    def loss(self, output, batch: dict, reference, pairs: jax.Array, step_weights: dict):
        policy, valid = pair_logprobs(output, batch)
        if self.uses_frozen:
            reference_sums, _ = pair_logprobs(reference, batch)
        else:
            reference_sums = batch[REFERENCE_LOGPS].astype(jnp.float32)
        per_pair, margin = dpo_terms(policy, reference_sums, self.beta)
        mean = lambda x: jnp.sum(x * valid) / jnp.maximum(pairs, 1.0)
        chosen = self.beta * (policy[:, 0] - reference_sums[:, 0])
        rejected = self.beta * (policy[:, 1] - reference_sums[:, 1])
        loss = mean(per_pair)
        return loss, {
            "main_loss": loss,
            "dpo_margin": mean(margin),
            "dpo_accuracy": mean(margin > 0),
            "dpo_chosen_reward": mean(chosen),
            "dpo_rejected_reward": mean(rejected),
            "pairs": jnp.sum(valid),
        }
