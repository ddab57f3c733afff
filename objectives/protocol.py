"""The interface through which every post-training objective plugs into the sharded step (trainer/step.py)."""

from types import MappingProxyType
from typing import Mapping, Protocol

import jax
import optax

NO_WEIGHTS: Mapping[str, optax.Schedule] = MappingProxyType({})  # an objective without scheduled weights


class Objective(Protocol):
    """A loss and what it reads; the step handles micro-batching, the optimizer and the frozen model."""

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The batch arrays it reads, each [B, S, ...] and sharded by rows."""

    @property
    def uses_frozen(self) -> bool:
        """Whether it needs the output of a frozen model (DPO / GRPO reference, distillation teacher) on
        the same batch."""

    @property
    def bias_update_rate(self) -> float:
        """The MoE selection-bias update after each step (off by default for RL objectives, whose
        batches are the policy's own samples)."""

    @property
    def weight_schedules(self) -> Mapping[str, optax.Schedule]:
        """Named loss weights as functions of the optimizer's applied-update count (the count the
        learning rate is read at); the step reads each once per step, logs it under its name and
        passes the values to `loss`."""

    def normalisers(self, batch: dict, num_mtp: int) -> jax.Array:
        """Counts over the whole global batch, taken before micro-batching, so that each micro-batch's
        loss and metrics are its share of the global mean and simply add up."""

    def loss(
        self, output, batch: dict, frozen_output, normalisers: jax.Array, step_weights: dict[str, jax.Array]
    ) -> tuple[jax.Array, dict]:
        """One micro-batch's (loss, metrics); `step_weights` holds this step's value of each of
        `weight_schedules`."""
