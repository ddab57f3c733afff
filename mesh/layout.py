"""Place named mesh axes on topology levels and derive the device order of the Mesh.

Each mesh axis of size s is factored over levels: s = prod of its factors, and at every level the
factors of all axes multiply to the level's fan-out. Axes are placed in `PLACEMENT_ORDER` (tensor
first), each taking from the innermost level with room the largest factor that divides both what
it still needs and what the level has left; pinned axes are placed before the others, starting at
their pinned level. Per prime factor this is water-filling, so it always succeeds when the sizes
multiply to the device count and no pin forbids it.

Everything here is numpy over topology ranks; `Layout.mesh()` is the only step that touches JAX
devices, so full-size layouts (768 or 12,288 devices) are computed on any machine.
"""

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from configs.release import ConfigError
from mesh import axes as mesh_axes
from mesh.topology import Level, Topology

REST = -1  # an axis size meaning "whatever the other axes leave"


@dataclasses.dataclass(frozen=True)
class AxisPlacement:
    """Where one mesh axis lives: its factor on every level it spans, innermost first."""

    name: str
    size: int
    factors: tuple[tuple[Level, int], ...]

    @property
    def levels(self) -> tuple[str, ...]:
        """Names of the levels this axis's collectives cross."""
        return tuple(level.name for level, _ in self.factors)

    @property
    def outermost_level(self) -> str | None:
        return self.factors[-1][0].name if self.factors else None

    @property
    def bottleneck_bandwidth(self) -> float | None:
        """Slowest per-device bandwidth among the crossed levels; None for a size-1 axis."""
        return min((level.bandwidth for level, _ in self.factors), default=None)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh shape laid out on a topology.

    device_ids[c] is the topology rank playing mesh coordinate c; axes are in MESH_AXES order.
    """

    topology: Topology
    axis_names: tuple[str, ...]
    device_ids: np.ndarray
    placements: dict[str, AxisPlacement]

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.device_ids.shape))

    def axis(self, name: str) -> AxisPlacement:
        if name not in self.placements:
            raise KeyError(f"mesh has no axis {name!r}; axes: {self.axis_names}")
        return self.placements[name]

    def mesh(self, devices=None) -> Mesh:
        """A Mesh over real devices (default `jax.devices()`); device i plays topology rank i.

        Axis types are Auto: logical sharding constraints are hints there, while under Explicit
        they become assertions (jax_cpu_notes.md, surprise 1).
        """
        devices = jax.devices() if devices is None else list(devices)
        needed = self.topology.num_devices
        if len(devices) < needed:
            raise ValueError(
                f"topology {self.topology.name!r} needs {needed} devices but {len(devices)} are "
                f"available; on a CPU host call mesh.emulate.emulate(topology) before JAX starts, "
                f"or set XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
            )
        grid = np.asarray(devices[:needed], dtype=object)[self.device_ids]
        return Mesh(grid, self.axis_names, axis_types=(AxisType.Auto,) * len(self.axis_names))

    def abstract_mesh(self) -> AbstractMesh:
        """The same mesh without devices, for shardings and AOT lowering of full-size layouts."""
        return AbstractMesh(self.device_ids.shape, self.axis_names, axis_types=(AxisType.Auto,) * len(self.axis_names))


def resolve_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Replaces a single -1 by the rest of the devices; checks the product; MESH_AXES order.

    Core axes missing from `sizes` get size 1.
    """
    unknown = [name for name in sizes if name not in mesh_axes.MESH_AXES]
    if unknown:
        raise ConfigError(f"unknown mesh axes {unknown}; valid: {mesh_axes.MESH_AXES}")
    bad = {name: size for name, size in sizes.items() if size < 1 and size != REST}
    if bad:
        raise ConfigError(f"axis sizes must be positive or {REST} (the rest), got {bad}")
    rest = [name for name, size in sizes.items() if size == REST]
    if len(rest) > 1:
        raise ConfigError(f"at most one axis may be {REST} (the rest); got {rest} in {sizes}")
    sizes = {**dict.fromkeys(mesh_axes.CORE_AXES, 1), **sizes}
    known = math.prod(size for size in sizes.values() if size != REST)
    resolved = dict(sizes)
    if rest:
        if num_devices % known:
            raise ConfigError(
                f"cannot size axis {rest[0]!r}: the other axes multiply to {known}, which does "
                f"not divide {num_devices} devices ({sizes})"
            )
        resolved[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ConfigError(
            f"mesh axis sizes multiply to {known} but the topology has {num_devices} devices "
            f"({sizes}); make them match or give one axis {REST}"
        )
    return {name: resolved[name] for name in mesh_axes.MESH_AXES if name in resolved}


def _place(name, size, start, free, topology):
    """Factors of one axis over levels >= start, taken from `free` (updated in place)."""
    factors, left = [], size
    for index in range(start, len(free)):
        take = math.gcd(left, free[index])
        if take > 1:
            factors.append((index, take))
            free[index] //= take
            left //= take
    if left != 1:
        room = ", ".join(f"{level.name}={free_size}" for level, free_size in zip(topology.levels[start:], free[start:]))
        taken = ", ".join(f"{topology.levels[index].name}:{factor}" for index, factor in factors)
        raise ConfigError(
            f"cannot place axis {name}={size} on {topology.name!r} from level "
            f"{topology.levels[start].name!r} outward: after taking ({taken or 'nothing'}) a "
            f"factor {left} is left that divides none of the free level capacities ({room}); "
            f"choose sizes that divide the levels or change the pins"
        )
    return factors


def plan_layout(topology: Topology, sizes: dict[str, int], pins: dict[str, str] | None = None) -> Layout:
    """Lays `sizes` (axis -> size, one may be -1) on `topology`; `pins` maps axis -> level name."""
    pins = dict(pins or {})
    resolved = resolve_sizes(sizes, topology.num_devices)
    for name in pins:
        if name not in resolved:
            raise ConfigError(f"pin for axis {name!r}, which is not in the mesh {list(resolved)}")
    start = {name: topology.level_index(level) for name, level in pins.items()}

    order = [name for name in mesh_axes.PLACEMENT_ORDER if name in resolved]
    order = [name for name in order if name in pins] + [name for name in order if name not in pins]
    free = [level.size for level in topology.levels]
    blocks = []  # (level index, axis, factor), in placement order
    for name in order:
        for index, factor in _place(name, resolved[name], start.get(name, 0), free, topology):
            blocks.append((index, name, factor))
    # Within a level, the axis placed first varies fastest (gets the nearest neighbours).
    blocks.sort(key=lambda block: block[0])  # stable: keeps placement order inside a level

    # Rank digits, outermost block first, so that C order makes the innermost block fastest.
    ranks = np.arange(topology.num_devices).reshape([factor for _, _, factor in reversed(blocks)])
    axis_names = tuple(resolved)
    permutation = []
    for name in axis_names:  # outer -> inner mesh axes, each from its outer block to its inner one
        own = [i for i, block in enumerate(blocks) if block[1] == name]
        permutation += [len(blocks) - 1 - i for i in reversed(own)]
    device_ids = ranks.transpose(permutation).reshape([resolved[name] for name in axis_names])

    placements = {
        name: AxisPlacement(
            name,
            resolved[name],
            tuple((topology.levels[index], factor) for index, axis, factor in blocks if axis == name),
        )
        for name in axis_names
    }
    return Layout(topology, axis_names, device_ids, placements)
