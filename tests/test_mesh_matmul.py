"""On 8 emulated devices, a matmul sharded along each mesh axis equals the unsharded one.

Each axis gets all 8 devices in turn and shards, in three separate programs, the rows of the
input (batch-like), the contraction dimension (needs a reduction across the axis) and the output
columns (tensor-like), so every axis carries a gather, a reduce and a no-communication case.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mesh import axes
from mesh.layout import plan_layout
from mesh.presets import get_topology

X = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32)
W = np.random.default_rng(1).normal(size=(32, 24)).astype(np.float32)
EXPECTED = X @ W


@pytest.mark.parametrize("axis", axes.CORE_AXES)
@pytest.mark.parametrize(
    "x_spec, w_spec",
    [
        (lambda a: P(a, None), lambda a: P(None, None)),
        (lambda a: P(None, a), lambda a: P(a, None)),
        (lambda a: P(None, None), lambda a: P(None, a)),
    ],
    ids=["rows", "contraction", "columns"],
)
def test_sharded_matmul_matches(axis, x_spec, w_spec):
    mesh = plan_layout(get_topology("cm384-8"), {axis: 8}).mesh()
    x = jax.device_put(X, NamedSharding(mesh, x_spec(axis)))
    w = jax.device_put(W, NamedSharding(mesh, w_spec(axis)))
    out = jax.jit(jnp.matmul, out_shardings=NamedSharding(mesh, P()))(x, w)
    np.testing.assert_allclose(np.asarray(out), EXPECTED, rtol=1e-5, atol=1e-5)


def test_all_axes_at_once_with_all_to_all_over_expert():
    """data x fsdp x expert x tensor = 1x2x2x2: 2-d sharded matmul, then an expert all-to-all."""
    mesh = plan_layout(get_topology("cm384-8"), dict(fsdp=2, expert=2, tensor=2)).mesh()
    x = jax.device_put(X, NamedSharding(mesh, P(("fsdp", "expert"), None)))
    w = jax.device_put(W, NamedSharding(mesh, P(None, "tensor")))
    out = jax.jit(jnp.matmul)(x, w)
    np.testing.assert_allclose(np.asarray(out), EXPECTED, rtol=1e-5, atol=1e-5)

    def swap(block):  # block [4, 24] per (fsdp, expert) shard: exchange halves along expert
        return jax.lax.all_to_all(block, "expert", split_axis=0, concat_axis=0, tiled=True)

    swapped = jax.shard_map(
        swap, mesh=mesh, in_specs=P(("fsdp", "expert"), None), out_specs=P(("fsdp", "expert"), None)
    )(np.asarray(out))
    blocks = EXPECTED.reshape(2, 2, 2, 2, 24)  # fsdp, expert (sender), half, rows, cols
    np.testing.assert_allclose(
        np.asarray(swapped).reshape(2, 2, 2, 2, 24), blocks.transpose(0, 2, 1, 3, 4), rtol=1e-5, atol=1e-5
    )
