"""The model on a mesh equals the model on one device: born-sharded initialisation, and forward logits
under the logical-axis rules on several mesh shapes. Tolerance: 1e-5 of the largest logit (float32;
sharded reductions add in another order)."""

import chex
import jax
import numpy as np
import pytest
from flax import nnx

from configs import parallelism
from mesh.sharding import activate
from model.transformer import DeepSeekV4
from tests.model_configs import parity_args
from trainer.sharded_init import build_mesh, init_sharded

RTOL = 1e-5
MESHES = [dict(fsdp=4, expert=2), dict(data=2, fsdp=2, tensor=2)]


@pytest.fixture(scope="module")
def unsharded():
    args = parity_args(num_layers=4, compress_ratios=(0, 0, 4, 128, 0))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(DeepSeekV4(args, nnx.Rngs(0)))[1])()  # the same program, unsharded
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (8, 160)).astype(np.int32)
    logits = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits)(state, tokens)
    return args, state, tokens, np.asarray(logits)


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items()))
def test_sharded_init_and_forward_match_single_device(unsharded, axes):
    args, state, tokens, expected = unsharded
    mesh_config = parallelism.get_config("cm384-8", **axes)
    mesh, rules = build_mesh(mesh_config), mesh_config.rules
    graphdef, sharded, shardings = init_sharded(args, mesh, rules, seed=0)
    chex.assert_trees_all_equal(sharded, state)
    experts = sharded["groups"][0]["blocks"][0]["moe"]["experts"]["w1"][...]
    assert experts.sharding.shard_shape(experts.shape)[1] == args.num_routed_experts // axes.get("expert", 1)
    with activate(mesh, rules):
        logits = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t).logits)(sharded, tokens)
    assert logits.sharding.spec[0] is not None  # batch stays sharded to the end
    error = np.abs(np.asarray(logits) - expected).max() / np.abs(expected).max()
    assert error < RTOL, error
