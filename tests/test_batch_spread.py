"""mesh/batch_spread.py on 8 emulated devices: the function sees whole items, the result equals the
unsharded one and keeps its sharding, and no device gathers the stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mesh.batch_spread import over_batch

CASES = [
    # shape, batch dims, spec, the shape each device's fn sees
    ((3, 16, 24), (0,), P(None, ("fsdp", "expert"), None), (1, 16, 24)),  # 3 items padded to 4
    ((2, 8, 16, 12), (0, 1), P(None, "expert", "fsdp", "data"), (2, 16, 12)),
    ((5, 8, 6), (0,), P(None, "fsdp", "expert"), (2, 8, 6)),  # two dims moved, 5 padded to 8
    ((8, 6, 4), (1,), P("expert", None, "fsdp"), (2, 8, 4)),  # batch dim not the first, 6 padded to 8
]


def centred_square(items):
    """Depends on every element of an item: each item minus its own mean, times its own sum of squares."""
    axes = tuple(range(1, items.ndim))
    return (items - items.mean(axes, keepdims=True)) * jnp.sum(items * items, axes, keepdims=True)


@pytest.mark.parametrize("shape, batch, spec, seen", CASES)
def test_whole_items_and_the_unsharded_result(shape, batch, spec, seen):
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "expert"))
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    rest = [d for d in range(len(shape)) if d not in batch]
    order = list(batch) + rest
    items = x.transpose(order).reshape(-1, *[shape[d] for d in rest])
    inverse = sorted(range(len(order)), key=order.__getitem__)
    expected = np.asarray(centred_square(items)).reshape([shape[d] for d in order]).transpose(inverse)
    shapes = []

    def fn(items):
        shapes.append(items.shape)
        return centred_square(items)

    sharding = NamedSharding(mesh, spec)
    spread = jax.jit(lambda a: over_batch(fn, a, spec, batch, mesh), out_shardings=sharding)
    compiled = spread.lower(jax.device_put(x, sharding)).compile()
    out = compiled(jax.device_put(x, sharding))
    assert shapes == [seen]
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    assert out.sharding.is_equivalent_to(sharding, out.ndim)
    assert "all-gather" not in compiled.as_text()
