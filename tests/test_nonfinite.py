"""Non-finite steps: the compiled step refuses an update whose loss, gradient or update is NaN/Inf
(state kept bit for bit, step counted) and applies finite ones; the policy stops or skips.

One compiled step serves every case: the NaN comes in through a parameter, the Inf through a learning
rate that `optax.inject_hyperparams` keeps in the optimizer state (loss and gradient stay finite).
"""

import logging

import jax
import ml_collections
import numpy as np
import optax
import pytest

from objectives.sft import SFT
from tests.model_configs import fresh_model, initial_train_state, parity_args
from trainer.nonfinite import NONFINITE, NONFINITE_STEPS, NonFinitePolicy, NonFiniteStepError
from trainer.state import TrainState
from trainer.step import make_train_step

LR = 1e-3
BATCH, SEQ = 4, 64


@pytest.fixture(scope="module")
def compiled():
    """-> (jitted step, initial state, batch) for a 2-layer model (a hash layer, CSA, HCA, MTP)."""
    args = parity_args(num_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=1)
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=LR)
    graphdef, params, routing = fresh_model(args)
    state = initial_train_state(params, routing, tx)
    train_config = ml_collections.ConfigDict(dict(balance_weight=1e-4, microbatches=1))
    objective = SFT(mtp_weight=optax.constant_schedule(0.3), bias_update_rate=1e-3)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(LR), train_config, objective))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab_size, (BATCH, SEQ)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "loss_mask": np.ones_like(tokens),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
    }
    return step, state, batch


def _leaves_equal(a, b) -> list[bool]:
    """Leaf by leaf (NaN equal to NaN); the trees must have the same structure."""
    return jax.tree.leaves(
        jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True), a, b)
    )


def _poisoned_params(params):
    """`params` with one NaN in the first leaf."""
    leaves, treedef = jax.tree.flatten(params)
    first = np.array(leaves[0])
    first.flat[0] = np.nan
    return jax.tree.unflatten(treedef, [first] + leaves[1:])


def _with_learning_rate(state, value):
    opt_state = state.opt_state._replace(hyperparams=dict(state.opt_state.hyperparams, learning_rate=np.float32(value)))
    return TrainState(
        step=state.step,
        params=state.params,
        opt_state=opt_state,
        routing=state.routing,
        rng=state.rng,
        nonfinite_steps=state.nonfinite_steps,
    )


def _assert_refused(step, state, batch, bad_metric):
    new, metrics = jax.device_get(step(state, batch))
    assert not np.isfinite(metrics[bad_metric]), metrics[bad_metric]
    assert metrics[NONFINITE] == 1 and metrics[NONFINITE_STEPS] == int(state.nonfinite_steps) + 1
    assert int(new.step) == int(state.step) + 1 and int(new.nonfinite_steps) == int(state.nonfinite_steps) + 1
    for name in ("params", "opt_state", "routing"):
        assert all(_leaves_equal(getattr(new, name), getattr(state, name))), f"{name} changed"


def test_a_finite_step_is_applied(compiled):
    step, state, batch = compiled
    new, metrics = jax.device_get(step(state, batch))
    assert metrics[NONFINITE] == 0 and metrics[NONFINITE_STEPS] == 0 and np.isfinite(metrics["update_norm"])
    assert int(new.step) == 1 and int(new.nonfinite_steps) == 0
    assert not all(_leaves_equal(new.params, state.params))
    assert int(new.opt_state.inner_state[0].count) == 1


def test_a_nan_loss_is_not_applied(compiled):
    step, state, batch = compiled
    _assert_refused(
        step,
        TrainState(
            step=np.int32(4),
            params=_poisoned_params(state.params),
            opt_state=state.opt_state,
            routing=state.routing,
            rng=state.rng,
            nonfinite_steps=np.int32(2),
        ),
        batch,
        "loss",
    )


def test_an_infinite_update_is_not_applied(compiled):
    step, state, batch = compiled
    _assert_refused(step, _with_learning_rate(state, np.inf), batch, "update_norm")


def test_policy_stop_raises_naming_the_step():
    with pytest.raises(NonFiniteStepError, match=r"step 7: loss nan, grad_norm nan, update_norm nan: not finite"):
        NonFinitePolicy("stop").handle(7, {"loss": "nan", "grad_norm": "nan", "update_norm": "nan", NONFINITE_STEPS: 1})


def test_policy_skip_warns_naming_the_step(caplog):
    with caplog.at_level(logging.WARNING):
        NonFinitePolicy("skip").handle(7, {"loss": 2.5, "grad_norm": "inf", "update_norm": "nan", NONFINITE_STEPS: 3})
    assert "step 7: loss 2.5, grad_norm inf, update_norm nan: not finite; update skipped (3 steps" in caplog.text


def test_unknown_policy_names_the_field():
    with pytest.raises(ValueError, match=r"train.nonfinite must be one of \('stop', 'skip'\), got 'ignore'"):
        NonFinitePolicy("ignore")
