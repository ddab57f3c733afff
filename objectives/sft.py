"""Supervised fine-tuning: next-token and MTP cross-entropy on the loss-masked tokens."""

import dataclasses
from typing import Mapping

import jax
import ml_collections
import optax

from configs.optimizer import decay_start
from data.packing import BATCH_FIELDS
from model.losses import language_model_loss, target_counts

MTP_WEIGHT = "mtp_weight"  # the name of the MTP weight in `weight_schedules`, the step's weights and metrics


def mtp_weight_schedule(train: ml_collections.ConfigDict, optimizer: ml_collections.ConfigDict) -> optax.Schedule:
    """The MTP weight per applied optimizer update: `train.mtp_weight`, then `train.mtp_weight_after_decay`
    from the update at which the learning-rate decay of `optimizer` starts (DeepSeek-V4: 0.3, then 0.1);
    constant when mtp_weight_after_decay is None."""
    if train.mtp_weight_after_decay is None:
        return optax.constant_schedule(train.mtp_weight)
    return optax.join_schedules(
        [optax.constant_schedule(train.mtp_weight), optax.constant_schedule(train.mtp_weight_after_decay)],
        boundaries=[decay_start(optimizer)],
    )


@dataclasses.dataclass(frozen=True)
class SFT:
    mtp_weight: optax.Schedule  # of the applied-update count (`mtp_weight_schedule`)
    bias_update_rate: float
    batch_keys = BATCH_FIELDS
    uses_frozen = False

    @property
    def weight_schedules(self) -> Mapping[str, optax.Schedule]:
        return {MTP_WEIGHT: self.mtp_weight}

    def normalisers(self, batch: dict, num_mtp: int) -> jax.Array:
        """Scored targets of the main head and each MTP depth in the whole batch [1 + num_mtp]."""
        return target_counts(batch["tokens"], batch["loss_mask"], batch["segment_ids"], num_mtp)

    def loss(self, output, batch: dict, frozen, counts: jax.Array, step_weights: dict[str, jax.Array]):
        """Main loss + this step's MTP weight x MTP loss (model.losses.language_model_loss)."""
        return language_model_loss(
            output, batch["tokens"], batch["loss_mask"], step_weights[MTP_WEIGHT], batch["segment_ids"], counts
        )
