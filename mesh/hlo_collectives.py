"""The collectives of a compiled XLA program, read from its HLO text, and the mesh axes each one spans.

Tests and the planner need to know what the partitioner really emitted (an all-to-all over `expert`,
all-gathers over `fsdp`, ...), not what the layout intended. Each collective instruction carries its
replica groups, listed (`{{0,1},{2,3}}`), in XLA's iota form (`[2,4]<=[4,2]T(1,0)`: the device ids
arange(8) reshaped to [4,2], transposed by (1,0), reshaped to 2 groups of 4) or over named axes of
a device grid (`mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`, whose devices may be laid out by an iota
`device_ids=([4,2]T(1,0))`: grid position i holds device i of that arrangement). A group
spans a set of mesh axes when its devices are exactly those reached by moving along those axes from
one device of the group.
"""

import dataclasses
import itertools
import math
import re

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}
# `%name = <result shape(s)> kind(` or the `-start` form of an async collective.
_INSTRUCTION = re.compile(r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z]+[0-9]*[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_LISTED = re.compile(r"replica_groups=\{(?P<groups>(?:\{[0-9,]*\},?)*)\}")
_IOTA = re.compile(r"replica_groups=\[(?P<shape>[0-9,]+)\]<=\[(?P<dims>[0-9,]+)\](?:T\((?P<perm>[0-9,]+)\))?")
_NAMED = re.compile(
    r"replica_groups=mesh\[(?P<mesh>[^\]]*)\]"
    r"(?:,\s*device_ids=\(\[(?P<ids>[0-9,]+)\](?:T\((?P<perm>[0-9,]+)\))?\))?\s*\{(?P<axes>[^}]*)\}"
)
_PAIRS = re.compile(r"source_target_pairs=\{(?P<pairs>(?:\{[0-9]+,[0-9]+\},?)*)\}")
# XLA numbers every fifth element of a long tuple shape (`/*index=5*/`); its `=` would end the shape.
INDEX_COMMENT = re.compile(r"/\*index=\d+\*/")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    bytes: int  # of the result, per device (for a tuple result, the sum of its arrays)
    groups: tuple  # tuple of tuples of device ids
    line: str

    def axes(self, mesh_axes: dict) -> tuple:
        """The mesh axes the groups span (see `group_axes`); a permute's pairs only lie within spans."""
        return group_axes(self.groups, mesh_axes, exact=self.kind != "collective-permute")


def _shape_bytes(text: str) -> int:
    total = 0
    for match in _ARRAY.finditer(text):
        if match["dtype"] in _BYTES:
            dims = [int(d) for d in match["dims"].split(",") if d]
            total += _BYTES[match["dtype"]] * math.prod(dims)
    return total


def _groups(line: str) -> tuple:
    listed = _LISTED.search(line)
    if listed:
        return tuple(
            tuple(int(d) for d in group.split(",") if d) for group in re.findall(r"\{([0-9,]*)\}", listed["groups"])
        )
    iota = _IOTA.search(line)
    if iota:
        shape = [int(d) for d in iota["shape"].split(",")]
        dims = [int(d) for d in iota["dims"].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota["perm"]:
            ids = ids.transpose([int(p) for p in iota["perm"].split(",")])
        return tuple(tuple(int(d) for d in row) for row in ids.reshape(shape[0], -1))
    named = _NAMED.search(line)
    if named:
        axes = re.findall(r"'([^']+)'=([0-9]+)", named["mesh"])
        names, dims = [a for a, _ in axes], [int(size) for _, size in axes]
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", named["axes"])]
        rest = [i for i in range(len(names)) if i not in chosen]
        ids = np.arange(math.prod(dims))
        if named["ids"]:
            ids = ids.reshape([int(d) for d in named["ids"].split(",")])
            if named["perm"]:
                ids = ids.transpose([int(p) for p in named["perm"].split(",")])
        ids = ids.reshape(dims).transpose(rest + chosen)
        return tuple(tuple(int(d) for d in row) for row in ids.reshape(-1, math.prod(dims[i] for i in chosen)))
    pairs = _PAIRS.search(line)
    if pairs:
        return tuple(tuple(int(d) for d in pair.split(",")) for pair in re.findall(r"\{([0-9,]+)\}", pairs["pairs"]))
    if "replica_groups=" in line or "source_target_pairs=" in line:
        raise ValueError(f"replica groups in a form this reader does not know: {line.strip()[:300]}")
    return ()


def parse(hlo_text: str) -> list:
    """Every collective instruction of the HLO module text (`compiled.as_text()`)."""
    found = []
    for line in hlo_text.splitlines():
        line = INDEX_COMMENT.sub("", line)
        match = _INSTRUCTION.search(line)
        if match and "-done(" not in line:
            found.append(Collective(match["kind"], _shape_bytes(match["shape"]), _groups(line), line.strip()))
    return found


def group_axes(groups: tuple, mesh_axes: dict, exact: bool = True) -> tuple:
    """The fewest mesh axes (names, mesh order) whose spans (the devices reached from one device by
    moving along those axes only) are the groups (exact) or contain them (not exact: permute pairs);
    `mesh_axes` maps name -> size in mesh order, device id = row-major index in the mesh. () when no
    group has two devices; raises when the groups follow no set of axes."""
    names = list(mesh_axes)
    ids = np.arange(math.prod(mesh_axes.values())).reshape(list(mesh_axes.values()))
    wanted = {frozenset(g) for g in groups if len(g) > 1}
    if not wanted:
        return ()
    for count in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), count):
            if any(mesh_axes[names[i]] == 1 for i in subset):
                continue
            rest = [i for i in range(len(names)) if i not in subset]
            spans = ids.transpose(rest + list(subset)).reshape(-1, math.prod(mesh_axes[names[i]] for i in subset))
            spans = [frozenset(row.tolist()) for row in spans]
            if all(group in spans if exact else any(group <= span for span in spans) for group in wanted):
                return tuple(names[i] for i in subset)
    raise ValueError(f"replica groups {sorted(map(sorted, wanted))[:4]}... follow no set of mesh axes of {mesh_axes}")
