"""Models born sharded: the initialiser runs under `jax.jit` with the rules' shardings as outputs, so no
parameter ever exists whole on one device."""

import jax
from flax import nnx

from mesh.layout import plan_layout
from mesh.presets import get_topology
from mesh.sharding import param_shardings
from model.args import ModelArgs
from model.transformer import DeepSeekV4


def build_mesh(mesh_config):
    """The device mesh of a parallelism config (topology preset + axis sizes + pins)."""
    topology = get_topology(mesh_config.topology)
    return plan_layout(topology, dict(mesh_config.axes), dict(mesh_config.pins)).mesh()


def init_sharded(args: ModelArgs, mesh, rules, seed: int):
    """-> (graphdef, state, shardings): the full model state created directly in its shardings."""
    abstract = nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(seed)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(DeepSeekV4(args, nnx.Rngs(seed)))[1], out_shardings=shardings)()
    return graphdef, state, shardings
