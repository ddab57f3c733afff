"""Post-training objectives, selected by `config.objective`; each one plugs into the same sharded step
(trainer/step.py) through the `Objective` interface (objectives/protocol.py): the batch arrays it
reads, whether it needs a frozen model, normalisers counted over the whole batch, its scheduled loss
weights, the loss of one micro-batch and the MoE bias update.
"""

import ml_collections

from configs.objectives import NAMES
from objectives.distill import Distill
from objectives.dpo import DPO
from objectives.grpo import GRPO
from objectives.protocol import Objective
from objectives.sft import SFT, mtp_weight_schedule


def build_objective(config: ml_collections.ConfigDict) -> Objective:
    """The objective `config.objective` names, with its settings from `config.<name>` (configs/objectives.py)."""
    name = config.objective
    if name not in NAMES:
        raise ValueError(f"config.objective={name!r} is not one of {NAMES}")
    if name == "sft":
        return SFT(
            mtp_weight=mtp_weight_schedule(config.train, config.optimizer),
            bias_update_rate=config.train.bias_update_rate,
        )
    if name == "dpo":
        return DPO(beta=config.dpo.beta, bias_update_rate=config.dpo.bias_update_rate, reference=config.dpo.reference)
    if name == "grpo":
        settings = config.grpo
        return GRPO(
            clip_low=settings.clip_low,
            clip_high=settings.clip_high,
            kl_coef=settings.kl_coef,
            bias_update_rate=settings.bias_update_rate,
            routing_replay=settings.routing_replay,
        )
    return Distill(bias_update_rate=config.distill.bias_update_rate)
