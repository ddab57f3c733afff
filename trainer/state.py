"""The train state: everything a step reads and writes, as one pytree with one sharding tree."""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from model import params as model_params
from model.transformer import DeepSeekV4
from trainer.sharded_init import init_sharded


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step: int32 scalar, steps taken (skipped ones included: each consumed a batch); params:
    trainable nnx.State (fp32 masters); opt_state: the optimizer's; routing: selection biases and hash
    tables (not trained by gradients); rng: a PRNG key; nonfinite_steps: int32 scalar, steps whose
    update was refused because the loss, gradient or update was NaN/Inf (see trainer.nonfinite)."""

    step: jax.Array
    params: Any
    opt_state: Any
    routing: Any
    rng: jax.Array
    nonfinite_steps: jax.Array


def split_variables(state):
    """Model state -> (trainable params, routing variables)."""
    params, routing = nnx.split_state(state, nnx.Param, (model_params.RoutingBias, model_params.HashTable))
    return params, routing


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def optimizer_shardings(tx, params, param_shardings, mesh):
    """Shardings of `tx`'s state for `params`: every leaf that stands for a parameter (moments,
    momentum, accumulators) takes that parameter's sharding, so the state is as sharded as the
    weights (ZeRO); the rest (step counts, scalars) is replicated on `mesh`. Read from the optimizer's
    structure (optax.tree_map_params), not from what a compiled init returns, which XLA may leave
    replicated."""
    shapes = jax.eval_shape(tx.init, params)
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)  # a partition's slot for another's params
    return optax.tree_map_params(tx, lambda leaf, sharding: leaf if masked(leaf) else sharding, shapes,
                                 param_shardings, transform_non_params=lambda _: replicated(mesh),
                                 is_leaf=masked)


def create_train_state(args, mesh, rules, tx, seed: int):
    """-> (graphdef, TrainState, its shardings). Parameters are born sharded; the optimizer state is
    initialised under jit from them, so it takes their shardings (moments shaped like parameters) or
    is replicated (scalars)."""
    graphdef, state, shardings = init_sharded(args, mesh, rules, seed)
    params, routing = split_variables(state)
    param_shardings, routing_shardings = split_variables(shardings)
    scalar = replicated(mesh)
    opt_shardings = optimizer_shardings(tx, params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    train_state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), scalar), params=params,
                             opt_state=opt_state, routing=routing,
                             rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), scalar),
                             nonfinite_steps=jax.device_put(jnp.zeros((), jnp.int32), scalar))
    state_shardings = TrainState(step=scalar, params=param_shardings,
                                 opt_state=jax.tree.map(lambda x: x.sharding, opt_state),
                                 routing=routing_shardings, rng=scalar, nonfinite_steps=scalar)
    return graphdef, train_state, state_shardings


def abstract_params(args):
    """The trainable parameters as an abstract nnx.State (shapes, dtypes, logical names; no arrays),
    e.g. for building the optimizer before anything is allocated."""
    return split_variables(nnx.state(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0)))))[0]
