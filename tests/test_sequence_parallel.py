"""Sequence parallelism between the tensor-parallel regions: on a mesh with `tensor`, the token-wise
parts of a block (residual streams, mHC, norms, the narrow projections of attention and the
compressors) run on 1/tensor of each sequence. Shown by XLA's FLOP count per device: a CSA block's
forward and backward on fsdp=2,expert=2,tensor=2 costs what it costs on fsdp=8 (where every part is
split 8 ways), while replicating those parts over tensor costs 1.40x; by the streams' sharding; and by
sequences the tensor axis does not divide, which run whole and still match one device."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import parallelism
from mesh.sharding import activate, param_shardings
from model.args import CSA
from model.block import Block
from tests.model_configs import parity_args
from trainer.sharded_init import build_mesh

TP = dict(fsdp=2, expert=2, tensor=2)
BATCH = 8
# Measured: 1.40 with those parts replicated over tensor (each rank computes all of them), 1.001 with
# sequence parallelism.
FLOP_BOUND = 1.1


def _block_problem(seq_len):
    args = parity_args(moe_dispatch="padded")
    block = Block(args, (CSA, "score"), nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    rng = np.random.default_rng(0)
    streams = rng.normal(size=(BATCH, seq_len, args.hc_mult, args.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (BATCH, seq_len)).copy()
    inputs = (
        streams,
        positions,
        np.ones((BATCH, seq_len), np.int32),
        rng.integers(0, args.vocab_size, (BATCH, seq_len)).astype(np.int32),
    )
    return graphdef, state, inputs


def _loss(graphdef, state, streams, positions, segment_ids, token_ids):
    out, _, _ = nnx.merge(graphdef, state)(streams, positions, segment_ids, token_ids)
    return jnp.sum(out * jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32))), out


def _compiled(axes, seq_len):
    """The block's value and gradient jitted on a mesh: (compiled, placed arguments)."""
    graphdef, state, inputs = _block_problem(seq_len)
    mesh_config = parallelism.get_config("cm384-8", **axes)
    mesh = build_mesh(mesh_config)
    with activate(mesh, mesh_config.rules):
        state = jax.device_put(state, param_shardings(nnx.eval_shape(lambda: state), mesh, mesh_config.rules))
        step = jax.jit(jax.value_and_grad(lambda st, *a: _loss(graphdef, st, *a), has_aux=True))
        compiled = step.lower(state, *inputs).compile()
    return compiled, (state,) + inputs


def test_tensor_ranks_split_the_token_wise_work():
    flops = {}
    for name, axes in (("tp", TP), ("fsdp", dict(fsdp=8))):
        compiled, _ = _compiled(axes, seq_len=64)
        flops[name] = compiled.cost_analysis()["flops"]
    assert flops["tp"] < FLOP_BOUND * flops["fsdp"], flops


@pytest.mark.parametrize("seq_len", [64, 63], ids=["divisible", "odd length"])
def test_streams_sharded_over_tensor_and_equal_to_one_device(seq_len):
    graphdef, state, inputs = _block_problem(seq_len)
    (expected_loss, expected), expected_grads = jax.jit(
        jax.value_and_grad(lambda st, *a: _loss(graphdef, st, *a), has_aux=True)
    )(state, *inputs)
    compiled, arguments = _compiled(TP, seq_len)
    (loss, out), grads = compiled(*arguments)
    spec = tuple(out.sharding.spec) + (None,) * out.ndim
    assert spec[1] == ("tensor" if seq_len % 2 == 0 else None)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    scale = np.abs(np.asarray(expected)).max()
    assert np.abs(np.asarray(out) - np.asarray(expected)).max() < 1e-5 * scale
    chex.assert_trees_all_equal_comparator(
        lambda a, b: np.abs(np.asarray(a) - b).max() <= 1e-4 * max(np.abs(b).max(), 1e-12),
        lambda a, b: f"largest difference {np.abs(np.asarray(a) - b).max()} of {np.abs(b).max()}",
        grads,
        jax.tree.map(np.asarray, expected_grads),
    )
