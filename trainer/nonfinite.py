"""Steps whose loss, gradient norm or update norm is NaN or Inf, and what a run does after one.

Inside the compiled step (`trainer.step`), `select_finite` keeps the previous parameters, optimizer
state and routing biases when any of the three is not finite, so a bad batch or an overflow never
reaches the state in memory, nor any checkpoint, whatever the policy. The step counter still
advances (the batch was consumed: the data position and the learning-rate schedule move on), the
optimizer's own counters do not (its state is kept whole), and `TrainState.nonfinite_steps` counts
the refused steps; the step reports `nonfinite` (this step) and `nonfinite_steps` (the run, resumes
included) in its metrics.

The policy (`config.train.nonfinite`) decides what the loop does next:
- "stop": raise NonFiniteStepError naming the step; the run ends without saving that step, and the
  last checkpoint is where to resume (e.g. with a lower learning rate).
- "skip": log a warning naming the step and continue with the next batch.
Either way the loop records the step's metrics first, so metrics.jsonl holds the non-finite values.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

STOP, SKIP = "stop", "skip"
POLICIES = (STOP, SKIP)
# Names of the step's metrics: 1 if this step's update was refused; refused steps of the run so far.
NONFINITE, NONFINITE_STEPS = "nonfinite", "nonfinite_steps"
# The scalars whose finiteness decides (also names of the step's metrics).
CHECKED = ("loss", "grad_norm", "update_norm")


def all_finite(*scalars) -> jax.Array:
    """A boolean scalar: every one of `scalars` is finite."""
    return jnp.all(jnp.isfinite(jnp.stack([jnp.asarray(s, jnp.float32) for s in scalars])))


def select_finite(finite: jax.Array, new, old):
    """`new` where `finite` is True, else `old` (same pytree structure), leaf by leaf: a select in the
    compiled step rather than a host branch, so one program serves both outcomes."""
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)


def was_refused(metrics: dict) -> bool:
    """Whether the step that returned `metrics` refused its update. Reads one device scalar, so the
    loop waits for every step here: the price of naming the exact step and stopping at once."""
    return bool(np.asarray(metrics[NONFINITE]))


def _describe(record: dict) -> str:
    return ", ".join(f"{name} {record[name]}" for name in CHECKED if name in record)


class NonFiniteStepError(FloatingPointError):
    """A step's loss, gradient norm or update norm was NaN or Inf and the policy is "stop"."""

    def __init__(self, step: int, record: dict):
        self.step = step
        super().__init__(
            f"step {step}: {_describe(record)}: not finite, so the update was not applied and "
            f"the run stops (train.nonfinite={STOP!r}); resume from the last checkpoint, e.g. "
            f"with a lower learning rate, or set --config.train.nonfinite={SKIP}"
        )


class NonFinitePolicy:
    """The configured reaction to a refused step; an unknown policy is a ValueError naming the field."""

    def __init__(self, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"train.nonfinite must be one of {POLICIES}, got {policy!r}")
        self.policy = policy

    def handle(self, step: int, record: dict) -> None:
        """After the refused `step` was recorded (`record`: its metrics record): raise or warn."""
        if self.policy == STOP:
            raise NonFiniteStepError(step, record)
        logging.warning(
            "step %d: %s: not finite; update skipped (%d steps skipped in this run)",
            step,
            _describe(record),
            record[NONFINITE_STEPS],
        )
