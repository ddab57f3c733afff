"""The full-size configs as shipped: their mesh lays out on the topology, every parameter of the real
model gets a valid sharding, all without devices (abstract tree, abstract mesh)."""
import math

import pytest
from flax import nnx

from configs import v4_flash, v4_pro
from mesh.layout import plan_layout
from mesh.presets import get_topology
from mesh.sharding import param_shardings
from model.args import from_config
from model.summary import abstract_model


@pytest.mark.parametrize("config_module", [v4_pro, v4_flash], ids=["v4_pro", "v4_flash"])
def test_every_parameter_shards_on_the_configured_mesh(config_module):
    config = config_module.get_config()
    topology = get_topology(config.mesh.topology)
    layout = plan_layout(topology, dict(config.mesh.axes), dict(config.mesh.pins))
    _, state = nnx.split(abstract_model(from_config(config.model)))
    shardings = param_shardings(state, layout.abstract_mesh(), config.mesh.rules)
    per_device = 0
    for var, sharding in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        shape = var[1].shape
        per_device += math.prod(sharding[1].get_value().shard_shape(shape))
    total = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))
    # Weights are replicated over `data` only; the rest of the mesh splits them (within 1.2x, the
    # small replicated vectors and uneven dense/expert splits).
    replicas = layout.shape["data"]
    assert per_device < 1.2 * total * replicas / layout.device_ids.size, per_device
