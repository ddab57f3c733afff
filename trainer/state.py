"""The train state: everything a step reads and writes, as one pytree with one sharding tree.

The optimizer state is sharded like the parameters it stands for, and further over the mesh axes
of the rules' `OPTIMIZER_STATE` entry that the parameter does not use (ZeRO-1): a weight replicated
over `data` keeps its moments split over `data`, and the update gathers what it needs.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mesh.axes import mesh_axes_of
from mesh.sharding import candidates
from model.params import split_variables
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


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


OPTIMIZER_STATE = "optimizer_state"  # the rules' name for the mesh axes that further shard the state


def state_axes(rules) -> tuple:
    """The mesh axes of the first `OPTIMIZER_STATE` rule in `rules`, () without one."""
    return mesh_axes_of(candidates(rules).get(OPTIMIZER_STATE, [None])[0])


def state_spec(spec: tuple, shape: tuple, sizes: dict, axes: tuple) -> tuple:
    """A parameter's PartitionSpec entries `spec` for an array of `shape` on a mesh of `sizes`, also
    split over each mesh axis of `axes` (size > 1) that it does not use yet: the axis joins the
    dimension with the most elements per device that it divides (none: the axis is skipped)."""
    spec = list(spec) + [None] * (len(shape) - len(spec))
    local = lambda dim: shape[dim] // math.prod(sizes[a] for a in mesh_axes_of(spec[dim]))
    for axis in axes:
        used = {a for entry in spec for a in mesh_axes_of(entry)}
        if sizes.get(axis, 1) == 1 or axis in used:
            continue
        dims = [dim for dim in range(len(shape)) if local(dim) % sizes[axis] == 0]
        if dims:
            dim = max(dims, key=local)
            spec[dim] = (*mesh_axes_of(spec[dim]), axis)
    return tuple(spec)


def optimizer_shardings(tx, params, param_shardings, mesh, rules=()):
    """Shardings of `tx`'s state for `params`: every leaf that stands for a parameter (moments,
    momentum, accumulators) takes that parameter's sharding, further split over the rules'
    `OPTIMIZER_STATE` axes (`state_spec`); the rest (step counts, scalars) is replicated on
    `mesh`. Read from the optimizer's structure (optax.tree_map_params), not from what a compiled
    init returns, which XLA may leave replicated."""
    shapes = jax.eval_shape(tx.init, params)
    axes = state_axes(rules)
    masked = lambda leaf: isinstance(leaf, optax.MaskedNode)  # a partition's slot for another's params
    sizes = dict(mesh.shape)

    def place(leaf, sharding):
        if masked(leaf):
            return leaf
        return NamedSharding(mesh, PartitionSpec(*state_spec(sharding.spec, leaf.shape, sizes, axes)))

    return optax.tree_map_params(
        tx, place, shapes, param_shardings, transform_non_params=lambda _: replicated(mesh), is_leaf=masked
    )


def create_train_state(args, mesh, rules, tx, seed: int):
    """-> (graphdef, TrainState, its shardings). Parameters are born sharded; the optimizer state is
    initialised under jit from them into `optimizer_shardings`."""
    graphdef, state, shardings = init_sharded(args, mesh, rules, seed)
    params, routing = split_variables(state)
    param_shardings, routing_shardings = split_variables(shardings)
    scalar = replicated(mesh)
    opt_shardings = optimizer_shardings(tx, params, param_shardings, mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    train_state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), scalar),
        params=params,
        opt_state=opt_state,
        routing=routing,
        rng=jax.device_put(jax.random.key_data(jax.random.key(seed)), scalar),
        nonfinite_steps=jax.device_put(jnp.zeros((), jnp.int32), scalar),
    )
    state_shardings = TrainState(
        step=scalar,
        params=param_shardings,
        opt_state=jax.tree.map(lambda x: x.sharding, opt_state),
        routing=routing_shardings,
        rng=scalar,
        nonfinite_steps=scalar,
    )
    return graphdef, train_state, state_shardings


def abstract_params(args):
    """The trainable parameters as an abstract nnx.State (shapes, dtypes, logical names; no arrays),
    e.g. for building the optimizer before anything is allocated."""
    return split_variables(nnx.state(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0)))))[0]
