"""Parameter creation with logical axis names, and the variable kinds that are not trained by gradients
(`split_variables` separates them from the parameters: the train state and checkpoints hold the two apart).

Variables carry their logical names as metadata only (`eager_sharding=False`): the model never needs
a mesh to exist, and `mesh.sharding.param_shardings` turns the names into shardings when one does.
"""

import jax
import jax.numpy as jnp
from flax import nnx


class RoutingBias(nnx.Variable):
    """Aux-loss-free balancing bias: used to choose experts, moved by a rule after each step, no gradient."""


class HashTable(nnx.Variable):
    """Frozen token-id -> expert-id table of the hash-routed layers."""


def split_variables(state):
    """Model state -> (trainable params, routing variables: the biases and hash tables)."""
    params, routing = nnx.split_state(state, nnx.Param, (RoutingBias, HashTable))
    return params, routing


def normal(rngs: nnx.Rngs, shape, names, stddev: float, dtype) -> nnx.Param:
    assert len(shape) == len(names), (shape, names)
    value = stddev * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=tuple(names), eager_sharding=False)


def constant(shape, names, fill: float, dtype, kind=nnx.Param):
    assert len(shape) == len(names), (shape, names)
    return kind(jnp.full(shape, fill, dtype), out_sharding=tuple(names), eager_sharding=False)
