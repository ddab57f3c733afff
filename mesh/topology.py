"""A hardware topology as a stack of link levels, innermost first.

Device rank r (the order in which the runtime lists devices) is read as a mixed-radix number whose
fastest-varying digit is the innermost level: on an Atlas A3 node ranks 2k and 2k+1 are the two
dies of one 910C, then the 8 chips of a server, then the servers of a supernode
(ascend_topology.md 3.1). Each level says how fast a device talks to peers that first differ at
that level, which is all the layout and the cost model need.
"""

import dataclasses
import math

from configs.release import ConfigError


@dataclasses.dataclass(frozen=True)
class Level:
    """One link level.

    name: the group this level forms (a `chip` level joins the dies of one chip).
    size: fan-out, how many groups of the level below make one group of this level.
    bandwidth: bytes/s per device, one direction, towards peers across this level.
    latency: seconds for a small message across this level; None where no figure is published.
    source: where the numbers come from (tags of ascend_topology.md).
    """

    name: str
    size: int
    bandwidth: float
    latency: float | None
    source: str

    def __post_init__(self):
        if self.size < 1 or self.bandwidth <= 0:
            raise ValueError(
                f"level {self.name!r}: size must be >= 1 and bandwidth > 0, got size={self.size}, "
                f"bandwidth={self.bandwidth}"
            )


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named stack of levels plus what one device holds and computes.

    hbm_bytes and peak_flops (dense BF16) are per device; host_bandwidth is bytes/s per device, one
    direction, between it and host memory when every device of a server moves data at once; None
    when unknown (custom topologies).
    """

    name: str
    levels: tuple[Level, ...]
    hbm_bytes: float | None = None
    peak_flops: float | None = None
    source: str = ""
    host_bandwidth: float | None = None

    def __post_init__(self):
        names = [level.name for level in self.levels]
        if len(set(names)) != len(names):
            raise ValueError(f"topology {self.name!r}: level names repeat: {names}")
        if not names:
            raise ValueError(f"topology {self.name!r} has no levels")

    @property
    def num_devices(self) -> int:
        return math.prod(level.size for level in self.levels)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    def level_index(self, name: str) -> int:
        if name not in self.level_names:
            raise ConfigError(
                f"topology {self.name!r} has no level {name!r}; levels (inner -> outer): {', '.join(self.level_names)}"
            )
        return self.level_names.index(name)

    def coordinates(self, rank: int) -> dict[str, int]:
        """Position of device `rank` in every level, e.g. {'chip': 1, 'server': 3, ...}."""
        if not 0 <= rank < self.num_devices:
            raise ValueError(f"rank {rank} outside 0..{self.num_devices - 1} of {self.name!r}")
        coords = {}
        for level in self.levels:
            rank, coords[level.name] = divmod(rank, level.size)
        return coords
