"""Post-training objectives, selected by `config.objective`; each one plugs into the same sharded step
(trainer/step.py) through this interface:

- `batch_keys`: the batch arrays it reads, each [B, S, ...] and sharded by rows;
- `uses_frozen`: whether it needs the output of a frozen model (DPO / GRPO reference, distillation
  teacher) on the same batch;
- `normalisers(batch, num_mtp)`: counts over the whole global batch, taken before micro-batching, so
  that each micro-batch's loss and metrics are its share of the global mean and simply add up;
- `loss(output, batch, frozen_output, normalisers) -> (loss, metrics)`;
- `bias_update_rate`: the MoE selection-bias update after each step (off by default for RL objectives,
  whose batches are the policy's own samples).
"""
import ml_collections

from objectives.distill import Distill
from objectives.dpo import DPO
from objectives.grpo import GRPO
from objectives.sft import SFT

NAMES = ("sft", "dpo", "grpo", "distill")


def build_objective(config: ml_collections.ConfigDict):
    """The objective `config.objective` names, with its settings from `config.<name>` (configs/objectives.py)."""
    name = config.objective
    if name not in NAMES:
        raise ValueError(f"config.objective={name!r} is not one of {NAMES}")
    if name == "sft":
        return SFT(mtp_weight=config.train.mtp_weight, bias_update_rate=config.train.bias_update_rate)
    if name == "dpo":
        return DPO(beta=config.dpo.beta, bias_update_rate=config.dpo.bias_update_rate,
                   reference=config.dpo.reference)
    if name == "grpo":
        settings = config.grpo
        return GRPO(clip_low=settings.clip_low, clip_high=settings.clip_high, kl_coef=settings.kl_coef,
                    bias_update_rate=settings.bias_update_rate, routing_replay=settings.routing_replay)
    return Distill(bias_update_rate=config.distill.bias_update_rate)
