"""Padding (segment 0) is not routed: a batch with extra padding rows, or with padding inside its
rows, gives the same expert load, balance loss and bias update as the same tokens without it, and
with a capacity factor the dropped assignments are exactly those of the real tokens (NumPy count)."""

import chex
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from model.args import from_config
from model.expert_dispatch import capacity
from model.transformer import DeepSeekV4

ROWS, SEQ = 2, 64
RATE = 1e-3


def _model(capacity_factor=0.0):
    config = tiny.get_config().model
    config.update(capacity_factor=capacity_factor)
    args = from_config(config)
    return DeepSeekV4(args, nnx.Rngs(0)), args


def _batch(rng, vocab):
    tokens = rng.integers(1, vocab, (ROWS, SEQ)).astype(np.int32)
    segments = np.ones((ROWS, SEQ), np.int32)
    segments[1, 40:] = 2  # two packed documents
    return tokens, segments


def _padded(tokens, segments, extra_rows: int, tail: int):
    """The same rows with `tail` padding positions after each (token 0, segment 0) and `extra_rows`
    rows of padding."""
    pad = lambda a, value: np.pad(a, ((0, extra_rows), (0, tail)), constant_values=value)
    return pad(tokens, 0), pad(segments, 0)


def _stats(model, tokens, segments):
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments), logits=False).moe


def test_padding_changes_neither_load_nor_balance_nor_bias_update():
    model, args = _model()
    tokens, segments = _batch(np.random.default_rng(0), args.vocab_size)
    plain = _stats(model, tokens, segments)
    padded = _stats(model, *_padded(tokens, segments, extra_rows=2, tail=32))
    chex.assert_trees_all_equal(padded.load, plain.load)
    chex.assert_trees_all_close(padded.balance, plain.balance, rtol=1e-6)
    assert float(jnp.sum(plain.load)) == ROWS * SEQ * args.num_experts_per_tok * (args.num_layers + args.num_mtp_layers)
    biases = []
    for load in (plain.load, padded.load):
        updated = nnx.clone(model)
        updated.update_routing_bias(load, RATE)
        biases.append(nnx.state(updated, nnx.Not(nnx.Param)))
    chex.assert_trees_all_equal(*biases)


def _expected_drops(experts, valid, cap, num_experts):
    """experts [b, s, k] of one layer -> assignments past `cap` per expert, over the valid tokens;
    a token's repeated choice of one expert is one assignment."""
    counts = np.zeros(num_experts, np.int64)
    for choice in experts[valid]:
        for expert in set(choice.tolist()):
            counts[expert] += 1
    return int(np.maximum(counts - cap, 0).sum())


def test_padding_takes_no_expert_capacity():
    model, args = _model(capacity_factor=0.5)
    tokens, segments = _padded(*_batch(np.random.default_rng(1), args.vocab_size), extra_rows=1, tail=8)
    stats = _stats(model, tokens, segments)
    cap = capacity(tokens.size, args.num_experts_per_tok, args.num_routed_experts, 0.5)
    experts = np.asarray(stats.experts)
    expected = [
        _expected_drops(experts[layer], segments > 0, cap, args.num_routed_experts) for layer in range(experts.shape[0])
    ]
    np.testing.assert_array_equal(np.asarray(stats.dropped), expected)
    assert sum(expected) > 0  # the cap binds somewhere, so the count is tested
