"""The post-training objectives on the real step: DPO raises the chosen-vs-rejected margin, distillation
lowers the reverse KL to a teacher, and routing replay makes the forward use exactly the recorded
experts (with the router still trained)."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import data as data_config
from data.pipeline import build_preference_pipeline
from model.transformer import DeepSeekV4
from objectives.distill import Distill
from objectives.dpo import DPO
from tests.model_configs import tiny_args
from trainer.state import TrainState, split_variables
from trainer.step import make_train_step

LR = 3e-3
SEQ = 64


def _args():
    return tiny_args(num_layers=3, compress_ratios=(0, 4, 0, 0), num_hash_layers=1)


def _train_config():
    return ml_collections.ConfigDict(dict(mtp_weight=0.3, balance_weight=1e-4, bias_update_rate=1e-3, microbatches=2))


def _state(args, tx, seed):
    state = jax.jit(lambda: nnx.split(DeepSeekV4(args, nnx.Rngs(seed)))[1])()
    params, routing = split_variables(state)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        routing=routing,
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def _graphdef(args):
    return nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))


def _frozen(state):
    return {"params": jax.tree.map(jnp.copy, state.params), "routing": jax.tree.map(jnp.copy, state.routing)}


def test_dpo_raises_the_margin_of_the_chosen_replies():
    args = _args()
    config = data_config.get_config(seq_len=SEQ, global_batch_size=8, prefetch=0)
    batch = next(iter(build_preference_pipeline(config)))
    assert set(np.unique(batch["segment_ids"])) == {0, 1, 2}
    tx = optax.adamw(LR)
    state = _state(args, tx, seed=0)
    frozen = _frozen(state)
    step = jax.jit(
        make_train_step(
            _graphdef(args), tx, optax.constant_schedule(LR), _train_config(), DPO(beta=0.1, bias_update_rate=0.0)
        )
    )
    history = []
    for _ in range(12):
        state, metrics = step(state, batch, frozen)
        history.append({k: float(metrics[k]) for k in ("main_loss", "dpo_margin", "dpo_accuracy", "pairs")})
    assert history[0]["pairs"] == 8
    np.testing.assert_allclose(history[0]["main_loss"], np.log(2.0), rtol=1e-5)  # policy == reference
    assert history[-1]["dpo_margin"] > 0.5 and history[-1]["dpo_accuracy"] == 1.0, history
    assert history[-1]["main_loss"] < 0.5 * history[0]["main_loss"], history
    chex.assert_trees_all_equal(frozen["routing"], state.routing)  # bias update off for DPO


def _completion_batch(args, rng, rows=8, prompt=8):
    tokens = rng.integers(0, args.vocab_size, (rows, SEQ)).astype(np.int32)
    mask = np.zeros_like(tokens)
    mask[:, prompt:] = 1
    return {
        "tokens": tokens,
        "loss_mask": mask,
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape).copy(),
    }


@pytest.mark.slow  # 1.5-2.5 min; the reverse-KL loss and gradient are checked in test_objectives.py
def test_distillation_lowers_the_reverse_kl_to_the_teacher():
    args = _args()
    tx = optax.adamw(LR)
    student = _state(args, tx, seed=0)
    teacher = _frozen(_state(args, tx, seed=1))
    batch = _completion_batch(args, np.random.default_rng(0))
    step = jax.jit(
        make_train_step(
            _graphdef(args), tx, optax.constant_schedule(LR), _train_config(), Distill(bias_update_rate=0.0)
        )
    )
    kls = []
    for _ in range(10):
        student, metrics = step(student, batch, teacher)
        kls.append(float(metrics["reverse_kl"]))
    assert kls[-1] < 0.5 * kls[0], kls


def test_routing_replay_uses_exactly_the_recorded_experts():
    args = _args()
    model = DeepSeekV4(args, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    batch = _completion_batch(args, np.random.default_rng(1), rows=2)
    forward = jax.jit(lambda st, replay: nnx.merge(graphdef, st)(batch["tokens"], routed_experts=replay))
    own = forward(state, None)
    layers, k = args.num_layers, args.num_experts_per_tok
    recorded = jnp.moveaxis(own.moe.experts[:layers], 0, 2)  # [b, s, layers, k]
    replayed = forward(state, recorded)
    np.testing.assert_array_equal(np.asarray(replayed.logits), np.asarray(own.logits))

    rng = np.random.default_rng(2)
    other = (
        np.stack([rng.permutation(args.num_routed_experts)[:k] for _ in range(2 * SEQ * layers)])
        .reshape(2, SEQ, layers, k)
        .astype(np.int32)
    )
    forced = forward(state, jnp.asarray(other))
    np.testing.assert_array_equal(np.moveaxis(np.asarray(forced.moe.experts[:layers]), 0, 2), other)
    assert np.abs(np.asarray(forced.logits) - np.asarray(own.logits)).max() > 1e-3

    params, routing = split_variables(state)

    @jax.jit
    def router_grad(p, replay):
        return jax.grad(
            lambda q: jnp.mean(nnx.merge(graphdef, q, routing)(batch["tokens"], routed_experts=replay).logits ** 2)
        )(p)

    grads = router_grad(params, jnp.asarray(other))
    router = grads["groups"][0]["blocks"][0]["moe"]["router"]["weight"][...]
    assert np.abs(np.asarray(router)).max() > 0  # gate weights still come from the trainer's router


def _digit_share(completion: str, record) -> float:
    """A reward a freshly initialised model already earns sometimes (exact answers it never gets):
    the share of the reply's characters that are digits."""
    del record
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def test_grpo_raises_the_reward_and_a_flipped_advantage_lowers_it():
    """GRPO with completions sampled from the current weights (trainer.rollout_source.SampledSource)
    on the shipped prompts: the mean reward of the last steps beats the first ones; with the advantage
    negated the same run must do worse (a wrong sign or ratio fails one of the two)."""
    from configs import tiny
    from data.pipeline import build_encoder
    from objectives.grpo import GRPO
    from trainer.rollout_source import SampledSource

    config = tiny.get_config()
    config.model.update(num_layers=3, compress_ratios=(0, 4, 0, 0), num_hash_layers=1)
    config.data.update(seq_len=SEQ, global_batch_size=8)
    config.grpo.update(group_size=4, max_new_tokens=6)
    args = _args()
    source = SampledSource(
        config, config.grpo, build_encoder(config.data), _graphdef(args), None, config.grpo.group_size, _digit_share
    )
    tx = optax.adam(1e-2)
    objective = GRPO(clip_low=0.2, clip_high=0.2, kl_coef=0.0, bias_update_rate=0.0)
    step = jax.jit(make_train_step(_graphdef(args), tx, optax.constant_schedule(1e-2), _train_config(), objective))

    def run(advantage_sign: float, steps: int = 30):
        source.set_state({"consumed": 0})
        state = _state(args, tx, seed=0)
        rewards = []
        for _ in range(steps):
            batch = source.next(state)
            rewards.append(source.metrics()["rollout/reward_mean"])
            batch["advantages"] = advantage_sign * batch["advantages"]
            state, _ = step(state, {k: batch[k] for k in objective.batch_keys})
        return np.asarray(rewards)

    rewards = run(+1.0)
    assert rewards[-5:].mean() > rewards[:5].mean() + 0.15, rewards
    flipped = run(-1.0)
    assert flipped[0] == rewards[0]  # same weights, prompts and key: the same first samples
    assert flipped[-5:].mean() < flipped[:5].mean(), flipped
