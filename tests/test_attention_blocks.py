"""The sliding window's query blocking and the query chunks change how scores are batched, never which
keys a query sees: attention outputs and gradients agree for blocks of W and W/4 rows, and for all
queries at once or a few blocks at a time, on packed rows whose length is not a multiple of any block."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.args import CSA, HCA, SLIDING
from model.attention import Attention
from tests.model_configs import parity_args

SEQ = 75
WINDOW = 16


PACKED = (40, 30)  # two documents, then padding up to SEQ


def attention_and_grad(kind, block, seq=SEQ, documents=PACKED, query_chunk=0):
    args = parity_args(sliding_window=WINDOW, window_block=block, query_chunk=query_chunk)
    layer = Attention(args, kind, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(2, seq, args.hidden_size)), jnp.float32)
    padding = seq - sum(documents)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(documents)] + [np.zeros(padding)])
    positions = np.concatenate([np.arange(n) for n in documents] + [np.zeros(padding)])
    segments = jnp.asarray(np.repeat(segments[None], 2, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat(positions[None], 2, axis=0), jnp.int32)
    cotangent = jnp.asarray(rng.normal(size=u.shape), jnp.float32)
    graphdef, state = nnx.split(layer)

    def loss(state, u):
        out, _ = nnx.merge(graphdef, state)(u, positions, segments)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, u)
    return out, grads


@pytest.mark.parametrize(
    "kind,seq,documents",
    [(SLIDING, SEQ, PACKED), (CSA, SEQ, PACKED), (SLIDING, 6, (6,))],  # shorter than the window minus a block
    ids=["sliding", "csa", "short"],
)
def test_window_blocks_agree(kind, seq, documents):
    out, (grad_state, grad_u) = attention_and_grad(kind, WINDOW, seq, documents)
    other, (other_state, other_u) = attention_and_grad(kind, WINDOW // 4, seq, documents)
    np.testing.assert_allclose(other, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other_u, grad_u, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(other_state, grad_state, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "kind,seq,documents",
    [(SLIDING, SEQ, PACKED), (CSA, SEQ, PACKED), (HCA, 300, (150, 140))],  # an HCA entry per document
    ids=["sliding", "csa", "hca"],
)
@pytest.mark.parametrize("chunk_blocks", [1, 3])  # of 4-row blocks: one block at a time, or 3 (the last padded)
def test_query_chunks_agree(kind, seq, documents, chunk_blocks):
    block = WINDOW // 4
    out, (grad_state, grad_u) = attention_and_grad(kind, block, seq, documents)
    other, (other_state, other_u) = attention_and_grad(kind, block, seq, documents, query_chunk=chunk_blocks * block)
    np.testing.assert_allclose(other, out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(other_u, grad_u, rtol=1e-5, atol=1e-6)
    # Weight gradients are summed over the chunks in another order: rounding of the tensor's scale
    # (measured at most 1.5e-6 on values up to ~6).
    chex.assert_trees_all_equal_comparator(
        lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(np.abs(b).max()))),
        lambda a, b: f"largest difference {float(np.abs(a - b).max())}",
        other_state,
        grad_state,
    )


def test_query_chunk_is_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="query_chunk"):
        parity_args(sliding_window=WINDOW, window_block=4, query_chunk=6)


def test_block_must_divide_the_window():
    with pytest.raises(ValueError, match="window_block"):
        parity_args(sliding_window=WINDOW, window_block=5)
