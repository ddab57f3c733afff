"""Named Ascend topologies, every figure cited from ../shared/design/ascend_topology.md.

Tags: [P] primary source, [S] secondary, [D] derived there from cited numbers. Bandwidths are per
device and one direction. Spec strings: a preset name, optionally `:count` (servers or supernodes;
`cm384:SxN` takes N servers of each of S supernodes), or `custom:name=size@bandwidth[/latency],...`
for any other machine (innermost level first).
"""

import re

from configs.release import ConfigError
from mesh.topology import Level, Topology

# --- Ascend 910C (Atlas A3): the software device is one die [P: CM384 3.3.1; HCCL-RT] -----------
DIES_PER_910C = 2  # two compute dies per package [P: CM384 3.3.1]
CHIPS_PER_A3_SERVER = 8  # 8 x 910C per Atlas 800T A3 node [P: CM384 3.3.2]
SERVERS_PER_CM384 = 48  # 48 nodes = 384 chips = 768 dies [P: CM384 3.3.3]
DIE_HBM_BYTES = 64e9  # 64 GB per die (128 GB per package) [P: CM384, SGL]
DIE_BF16_FLOPS = 376e12  # ~376 TFLOPS dense BF16 per die, +-5% [D: topology notes section 1]
DIE_PAIR_BANDWIDTH = 270e9  # on-package die-to-die, 540 GB/s total [P: CM384 Fig.3]
UB_BANDWIDTH = 196e9  # unified bus per die, 7 x 224 Gbps [P: CM384]
UB_NODE_LATENCY = 1.2e-6  # 512 B read, same node [P: CM384 Tab.1]
UB_SUPERNODE_LATENCY = 1.9e-6  # 512 B read, other node of the supernode [P: CM384 Tab.1]
A3_ROCE_BANDWIDTH = 25e9  # 200 Gbps RDMA per die [P: CM384 3.3.2]
CPUS_PER_A3_SERVER = 4  # 4 Kunpeng CPUs per node [P: CM384 3.3.2]
CPU_UB_BANDWIDTH = 160e9  # ~160 GB/s UB per CPU [P: CM384 3.3.2]
A3_HOST_BANDWIDTH = CPUS_PER_A3_SERVER * CPU_UB_BANDWIDTH / (CHIPS_PER_A3_SERVER * DIES_PER_910C)  # 40 GB/s per die [D]

# --- Ascend 910B (Atlas A2) ------------------------------------------------------------------
NPUS_PER_A2_SERVER = 8  # 8 x 910B per Atlas 800T A2 server [P: SGL, HCCL perf tester]
A2_HBM_BYTES = 64e9  # 64 GB [P: SGL; S: Chiao]
A2_BF16_FLOPS = 320e12  # third-party tables give 280-320 TFLOPS, SKU dependent [S: Chiao]
A2_HCCS_BANDWIDTH = 196e9  # 7 peer links, 392 GB/s aggregate bidir -> 196 one way [S: Chiao; D]
A2_ROCE_BANDWIDTH = 25e9  # 200 Gbps RoCE per NPU [S: DeepServe]

_CM384_SOURCE = "CloudMatrix384 / Atlas 900 A3 SuperPoD [P: CM384 3.3, Tab.1]"
_A2_SOURCE = "Atlas 800T A2 server [S: Chiao; P: SGL; S: DeepServe]"


def _chip(dies=DIES_PER_910C):
    return Level("chip", dies, DIE_PAIR_BANDWIDTH, None, "die pair (SIO), latency n/p [P: CM384 Fig.3]")


def _server(chips=CHIPS_PER_A3_SERVER):
    return Level("server", chips, UB_BANDWIDTH, UB_NODE_LATENCY, "UB via L1 switch [P: CM384 Tab.1]")


def _supernode(servers=SERVERS_PER_CM384):
    return Level(
        "supernode", servers, UB_BANDWIDTH, UB_SUPERNODE_LATENCY, "UB via L1+L2, non-blocking [P: CM384 3.3.3, Tab.1]"
    )


def _a3_cluster(supernodes):
    return Level("cluster", supernodes, A3_ROCE_BANDWIDTH, None, "RoCE, latency n/p [P: CM384 3.3.2]")


def _a3(name, levels):
    return Topology(name, tuple(levels), DIE_HBM_BYTES, DIE_BF16_FLOPS, _CM384_SOURCE, A3_HOST_BANDWIDTH)


def cm384(supernodes=1, servers=SERVERS_PER_CM384):
    """One CloudMatrix384 (768 dies), or `supernodes` of them joined over RoCE; `servers` < 48 uses
    that many of each supernode's servers, as deployments that take part of a supernode do (the
    CM384 serving setup ran on 256 of its 384 chips [P: CM384]), e.g. 4 x 32 servers = 1,024 chips."""
    if not 1 <= servers <= SERVERS_PER_CM384:
        raise ConfigError(f"a CloudMatrix384 supernode has 1..{SERVERS_PER_CM384} servers, got {servers}")
    levels = [_chip(), _server(), _supernode(servers)]
    if supernodes > 1:
        levels.append(_a3_cluster(supernodes))
    name = "cm384" if supernodes == 1 else f"cm384:{supernodes}"
    if servers != SERVERS_PER_CM384:
        name = f"cm384:{supernodes}x{servers}"
    return _a3(name, levels)


def cm384_8():
    """8 devices that keep every A3 intra-supernode level: 2 servers x 2 chips x 2 dies."""
    return _a3("cm384-8", [_chip(), _server(2), _supernode(2)])


def cm384_12():
    """12 devices with a factor 3 on the supernode level, as a CM384's 48 servers have (V4-Pro's
    data=3 there): 3 servers x 2 chips x 2 dies."""
    return _a3("cm384-12", [_chip(), _server(2), _supernode(3)])


def cm384_16():
    """16 devices with the RoCE level too: 2 supernodes x 2 servers x 2 chips x 2 dies."""
    return _a3("cm384-16", [_chip(), _server(2), _supernode(2), _a3_cluster(2)])


def cm384_64():
    """64 devices: 4 full A3 servers (16 dies each) on the unified bus."""
    return _a3("cm384-64", [_chip(), _server(), _supernode(4)])


def _a2_server():
    return Level("server", NPUS_PER_A2_SERVER, A2_HCCS_BANDWIDTH, None, "HCCS full mesh, latency n/p [S: Chiao]")


def atlas800t_a2():
    """One Atlas 800T A2 server: 8 x 910B on HCCS."""
    return Topology("atlas800t-a2", (_a2_server(),), A2_HBM_BYTES, A2_BF16_FLOPS, _A2_SOURCE)


def a2_cluster(servers):
    """`servers` Atlas 800T A2 servers over RoCE."""
    roce = Level("cluster", servers, A2_ROCE_BANDWIDTH, None, "RoCE, latency n/p [S: DeepServe]")
    return Topology(f"a2-cluster:{servers}", (_a2_server(), roce), A2_HBM_BYTES, A2_BF16_FLOPS, _A2_SOURCE)


def custom(levels_text):
    """Levels from text: `name=size@bandwidth[/latency],...`, innermost first, SI floats."""
    levels = []
    for item in levels_text.split(","):
        try:
            name, rest = item.split("=")
            size, rest = rest.split("@")
            bandwidth, _, latency = rest.partition("/")
            levels.append(
                Level(
                    name.strip(),
                    int(size),
                    float(bandwidth),
                    float(latency) if latency else None,
                    "given on the command line",
                )
            )
        except ValueError as err:
            raise ConfigError(
                f"bad level {item!r} in {levels_text!r}: expected name=size@bandwidth[/latency], "
                f"e.g. chip=2@270e9,server=8@196e9/1.2e-6 ({err})"
            ) from None
    return Topology(f"custom:{levels_text}", tuple(levels), source="given on the command line")


# name -> (factory, what the optional `:arg` means, or None when the preset takes none)
PRESETS = {
    "atlas800t-a2": (atlas800t_a2, None),
    "a2-cluster": (a2_cluster, "number of A2 servers"),
    "cm384": (
        cm384,
        "number of supernodes (optional, default 1), optionally x servers used of each "
        "(1-48, default 48), e.g. cm384:4x32",
    ),
    "cm384-8": (cm384_8, None),
    "cm384-12": (cm384_12, None),
    "cm384-16": (cm384_16, None),
    "cm384-64": (cm384_64, None),
    "custom": (custom, "levels name=size@bandwidth[/latency],... innermost first"),
}
_ARG_REQUIRED = ("a2-cluster", "custom")


def valid_specs() -> str:
    return "; ".join(name + (f"[:{arg}]" if arg else "") for name, (_, arg) in PRESETS.items())


def get_topology(spec: str) -> Topology:
    """Topology for a spec string such as `cm384`, `cm384:4`, `a2-cluster:16`, `custom:...`."""
    name, sep, arg = spec.partition(":")
    if name not in PRESETS:
        raise ConfigError(f"unknown topology {spec!r}; valid: {valid_specs()}")
    factory, arg_doc = PRESETS[name]
    if not sep:
        if name in _ARG_REQUIRED:
            raise ConfigError(f"topology {name!r} needs ':<{arg_doc}>', e.g. {name}:2")
        return factory()
    if arg_doc is None:
        raise ConfigError(f"topology {name!r} takes no ':' argument; valid: {valid_specs()}")
    if name == "custom":
        return factory(arg)
    if name == "cm384" and re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", arg):
        supernodes, servers = arg.split("x")
        return factory(int(supernodes), int(servers))
    if not arg.isdigit() or int(arg) < 1:
        raise ConfigError(f"topology {spec!r}: {arg_doc} must be a positive integer, got {arg!r}")
    return factory(int(arg))


def smaller_parts(spec: str) -> list[str]:
    """Specs of `spec`'s machine cut down, smallest first (by devices), `spec`'s own size last: for
    CM384s every s x n (s <= its supernodes, n <= 48 servers of each) up to its device count; for
    an A2 cluster 1..its servers; any other topology only itself."""
    topology = get_topology(spec)
    name = spec.partition(":")[0]
    if name == "cm384":
        sizes = [(s, n) for s in range(1, _supernodes(topology) + 1) for n in range(1, SERVERS_PER_CM384 + 1)]
        dies = lambda sn: sn[0] * sn[1] * CHIPS_PER_A3_SERVER * DIES_PER_910C
        fitting = sorted((sn for sn in sizes if dies(sn) <= topology.num_devices), key=lambda sn: (dies(sn), sn[0]))
        return [f"cm384:{s}x{n}" for s, n in fitting]
    if name == "a2-cluster":
        return [f"a2-cluster:{n}" for n in range(1, topology.num_devices // NPUS_PER_A2_SERVER + 1)]
    return [spec]


def _supernodes(topology: Topology) -> int:
    clusters = [level.size for level in topology.levels if level.name == "cluster"]
    return clusters[0] if clusters else 1
