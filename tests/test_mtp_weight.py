"""The MTP weight schedule (DeepSeek-V4: 0.3, then 0.1 from the update at which the learning-rate decay
starts): read at the optimizer's applied-update count, so accumulating calls and refused steps do not
move it; logged as `mtp_weight`; the SFT loss is main + weight x MTP at every step; constant when
config.train.mtp_weight_after_decay is None, as in the tiny config."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from configs import optimizer, tiny, v4_flash
from objectives import build_objective
from objectives.sft import MTP_WEIGHT, SFT, mtp_weight_schedule
from tests.model_configs import fresh_model, initial_train_state, tiny_args
from trainer.nonfinite import NONFINITE
from trainer.optimizer import build_optimizer, learning_rate_schedule
from trainer.step import make_train_step

BATCH, SEQ = 4, 32
DECAY_START = 2  # total_steps 10 - decay_steps 8


def _train_config(after):
    return ml_collections.ConfigDict(
        dict(mtp_weight=0.3, mtp_weight_after_decay=after, balance_weight=0.0, bias_update_rate=1e-3, microbatches=1)
    )


def _optimizer_config(**overrides):
    fields = dict(learning_rate=1e-3, warmup_steps=0, total_steps=10, decay_steps=10 - DECAY_START, adam_eps=1e-8)
    return optimizer.get_config("adamw", **{**fields, **overrides})


def test_the_v4_configs_lower_the_weight_where_the_decay_starts_and_tiny_keeps_it():
    config = v4_flash.get_config()
    start = optimizer.decay_start(config.optimizer)
    assert start == config.optimizer.warmup_steps == 2000
    weight = build_objective(config).weight_schedules[MTP_WEIGHT]
    assert [float(weight(count)) for count in (0, start - 1, start, 10**6)] == pytest.approx([0.3, 0.3, 0.1, 0.1])
    constant = build_objective(tiny.get_config()).weight_schedules[MTP_WEIGHT]
    assert [float(constant(count)) for count in (0, 10**6)] == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("decay_steps", [None, 8])
def test_the_switch_is_the_learning_rate_schedules_decay_boundary(decay_steps):
    config = _optimizer_config(warmup_steps=1, decay_steps=decay_steps)
    start = optimizer.decay_start(config)
    rate = learning_rate_schedule(config)
    assert float(rate(start)) == pytest.approx(config.learning_rate)
    assert float(rate(start + 1)) < config.learning_rate
    weight = mtp_weight_schedule(_train_config(0.1), config)
    assert [float(weight(count)) for count in (start - 1, start)] == pytest.approx([0.3, 0.1])


def _poisoned(params):
    """`params` with one NaN in the first leaf: the step's loss is NaN and the step is refused."""
    leaves, treedef = jax.tree.flatten(params)
    first = np.array(leaves[0])
    first.flat[0] = np.nan
    return jax.tree.unflatten(treedef, [first] + leaves[1:])


def _run(train_config, optimizer_config, calls, poison_at=()):
    """-> the metrics of `calls` calls of a 1-layer model's SFT step (objective from the configs), each
    on the state the previous one left; the calls in `poison_at` get a NaN parameter."""
    args = tiny_args(num_layers=1, compress_ratios=(0, 0), num_hash_layers=0)
    graphdef, params, routing = fresh_model(args)
    tx = build_optimizer(optimizer_config, params)
    state = initial_train_state(params, routing, tx)
    objective = SFT(
        mtp_weight=mtp_weight_schedule(train_config, optimizer_config), bias_update_rate=train_config.bias_update_rate
    )
    step = jax.jit(make_train_step(graphdef, tx, learning_rate_schedule(optimizer_config), train_config, objective))
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (BATCH, SEQ)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "loss_mask": np.ones_like(tokens),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
    }
    history = []
    for call in range(calls):
        if call in poison_at:
            refused, metrics = step(dataclasses.replace(state, params=_poisoned(state.params)), batch)
            state = dataclasses.replace(refused, params=state.params)
        else:
            state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return history


def _assert_sft_loss(metrics, weight):
    assert float(metrics[MTP_WEIGHT]) == pytest.approx(weight)
    expected = float(metrics["main_loss"]) + weight * float(metrics["mtp_loss"])
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-6)


def test_the_weight_switches_after_applied_updates_only():
    """Updates apply on every second call (accumulation_steps=2) and call 2 is refused: the optimizer's
    count reaches DECAY_START = 2 at call 5 (state.step counts every call and would reach it at call 2)."""
    history = _run(_train_config(0.1), _optimizer_config(accumulation_steps=2), calls=6, poison_at=(2,))
    assert [int(metrics[NONFINITE]) for metrics in history] == [0, 0, 1, 0, 0, 0]
    assert [float(metrics[MTP_WEIGHT]) for metrics in history] == pytest.approx([0.3] * 5 + [0.1])
    for metrics in (history[0], history[4]):
        _assert_sft_loss(metrics, 0.3)
    _assert_sft_loss(history[5], 0.1)


def test_a_constant_weight_gives_main_plus_its_weight_times_mtp_at_every_step():
    history = _run(_train_config(None), _optimizer_config(), calls=DECAY_START + 1)
    for metrics in history:
        _assert_sft_loss(metrics, 0.3)
