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


# V4-Pro spreads its routed experts over data x expert (one per die); V4-Flash replicates them over data.
@pytest.mark.parametrize("config_module,routed_replicas", [(v4_pro, 1), (v4_flash, 3)], ids=["v4_pro", "v4_flash"])
def test_every_parameter_shards_on_the_configured_mesh(config_module, routed_replicas):
    config = config_module.get_config()
    topology = get_topology(config.mesh.topology)
    layout = plan_layout(topology, dict(config.mesh.axes), dict(config.mesh.pins))
    _, state = nnx.split(abstract_model(from_config(config.model)))
    shardings = param_shardings(state, layout.abstract_mesh(), config.mesh.rules)
    per_device, expected = 0, 0.0
    for (path, var), (_, sharding) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        per_device += math.prod(sharding.get_value().shard_shape(var.shape))
        routed = "expert" in var.get_metadata()["out_sharding"]
        replicas = routed_replicas if routed else layout.shape["data"]
        expected += math.prod(var.shape) * replicas / layout.device_ids.size
    # The rest of the mesh splits them (within 1.2x: the small replicated vectors and uneven splits).
    assert per_device < 1.2 * expected, (per_device, expected)
