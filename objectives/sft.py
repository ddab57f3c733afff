"""Supervised fine-tuning: next-token and MTP cross-entropy on the loss-masked tokens."""
import dataclasses

import jax

from model.losses import language_model_loss, target_counts
from objectives.sequence import BATCH_FIELDS


@dataclasses.dataclass(frozen=True)
class SFT:
    mtp_weight: float
    bias_update_rate: float
    batch_keys = BATCH_FIELDS
    uses_frozen = False

    def normalisers(self, batch: dict, num_mtp: int) -> jax.Array:
        """Scored targets of the main head and each MTP depth in the whole batch [1 + num_mtp]."""
        return target_counts(batch["tokens"], batch["loss_mask"], batch["segment_ids"], num_mtp)

    def loss(self, output, batch: dict, frozen, counts: jax.Array):
        return language_model_loss(output, batch["tokens"], batch["loss_mask"], self.mtp_weight,
                                   batch["segment_ids"], counts)
