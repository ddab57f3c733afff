"""The weights a Checkpointer step holds for a model config: each variable's collection (`params` or
`routing`, as `model.params.split_variables` splits them), flat path, shape, dtype and partition
spec on the target mesh. No arrays and no devices: the mesh is abstract."""

import dataclasses
import math

import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from mesh.presets import get_topology
from mesh.sharding import activate, param_shardings
from mesh.layout import plan_layout
from model.args import ModelArgs
from model.params import split_variables
from model.transformer import DeepSeekV4

PARAMS, ROUTING = "params", "routing"
VALUE_KEY = "value"  # the leaf key of an nnx variable in a saved train state


@dataclasses.dataclass(frozen=True)
class Leaf:
    collection: str  # PARAMS or ROUTING
    path: str  # flat dotted path, e.g. "groups.1.blocks.0.attn.wq_a"
    shape: tuple
    dtype: np.dtype  # the model's dtype for it
    spec: PartitionSpec  # on the target mesh
    mesh_sizes: tuple  # ((axis, size), ...) of the target mesh

    @property
    def keys(self) -> tuple:
        """Its keys in a saved train state's nested dict, e.g. ('params', 'embed', 'value')."""
        return (self.collection, *self.path.split("."), VALUE_KEY)

    @property
    def name(self) -> str:
        """Its array name inside an Orbax PyTree item."""
        return ".".join(self.keys)

    def shard_shape(self) -> tuple:
        sizes = dict(self.mesh_sizes)
        entries = tuple(self.spec) + (None,) * (len(self.shape) - len(self.spec))
        ways = [math.prod(sizes[a] for a in ((e,) if isinstance(e, str) else e)) if e else 1 for e in entries]
        return tuple(n // w for n, w in zip(self.shape, ways))


def model_leaves(args: ModelArgs, mesh_config) -> dict:
    """{flat path: Leaf} of every model variable, with specs on the mesh of `mesh_config`."""
    layout = plan_layout(get_topology(mesh_config.topology), dict(mesh_config.axes), dict(mesh_config.pins))
    mesh, rules = layout.abstract_mesh(), mesh_config.rules
    with activate(mesh, rules):
        _, abstract = nnx.split(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
        shardings = param_shardings(abstract, mesh, rules)
    leaves = {}
    for collection, (state, state_shardings) in zip(
        (PARAMS, ROUTING), zip(split_variables(abstract), split_variables(shardings))
    ):
        specs = {".".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(state_shardings)}
        for keys, variable in nnx.to_flat_state(state):
            path = ".".join(map(str, keys))
            value = variable.get_value()
            leaves[path] = Leaf(
                collection, path, tuple(value.shape), np.dtype(value.dtype), specs[path], tuple(mesh.shape.items())
            )
    return leaves
