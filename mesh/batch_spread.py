"""Run a function on whole matrices of a sharded stack: its batch dims spread over the mesh instead.

`over_batch(fn, x, spec, batch, mesh)` takes `x` laid out by `spec` (a PartitionSpec) whose
`batch` dims index independent items (layers, experts) and whose other dims may be sharded. Inside
a shard_map, the local batch dims are merged into one, zero-padded to a multiple of the number of
devices that shard the other dims, and each of those mesh axes is moved onto the merged dim by an
all-to-all. `fn` then sees [n, *other dims whole]: every device holds n whole items, no device
holds the stack. The result goes back the same way and keeps `spec`.

Invariant: `fn` acts on each item of the leading dim on its own (padding items are zeros and are
dropped); it must keep the shape. Used by Muon's Newton-Schulz (trainer/optimizer.py), which needs
each matrix whole: gathered instead, a 256-way sharded stack of 29 matrices sat whole on every die.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from mesh.axes import mesh_axes_of


def _moved_axes(spec: tuple, batch: tuple, sizes: dict) -> list[tuple[int, tuple]]:
    """(dim, its mesh axes) for every non-batch dim that a mesh axis of size > 1 shards."""
    moved = []
    for dim, entry in enumerate(spec):
        axes = tuple(a for a in mesh_axes_of(entry) if sizes[a] > 1)
        if dim not in batch and axes:
            moved.append((dim, axes))
    return moved


def over_batch(fn, x: jax.Array, spec, batch: tuple[int, ...], mesh) -> jax.Array:
    """fn over whole non-batch dims of x (see the module docstring). fn: [n, *rest] -> same, where
    rest are x's non-batch dims in order. Without sharded non-batch dims, fn on the local shards."""
    spec = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    sizes = dict(mesh.shape)
    moved = _moved_axes(spec, batch, sizes)
    rest = [dim for dim in range(x.ndim) if dim not in batch]
    position = {dim: 1 + i for i, dim in enumerate(rest)}
    ways = math.prod(sizes[a] for _, axes in moved for a in axes)

    def local(shard):
        order = list(batch) + rest
        items = shard.transpose(order)
        rest_shape = items.shape[len(batch) :]
        count = math.prod(items.shape[: len(batch)])
        items = items.reshape(count, *rest_shape)
        items = jnp.pad(items, [(0, -count % ways)] + [(0, 0)] * len(rest_shape))
        for dim, axes in moved:
            items = lax.all_to_all(items, axes, 0, position[dim], tiled=True)
        items = fn(items)
        for dim, axes in reversed(moved):
            items = lax.all_to_all(items, axes, position[dim], 0, tiled=True)
        batch_shape = [shard.shape[d] for d in batch]
        items = items[:count].reshape(*batch_shape, *rest_shape)
        inverse = sorted(range(len(order)), key=order.__getitem__)
        return items.transpose(inverse)

    partition = jax.sharding.PartitionSpec(*spec)
    return jax.shard_map(local, mesh=mesh, in_specs=partition, out_specs=partition, check_vma=False)(x)
