"""The processes of one conversion: every process converts its share of the tensors into the same
output (a filesystem all of them see), process 0 writes the files that exist once and publishes the
directory. One process is a team of one; nothing here then needs JAX's distributed runtime.

A conversion of a 1.6T release is bound by reading and decoding on one host; N hosts (`convert.py
--num_processes=N ...`, as train.py takes them) read N disjoint sets of source tensors, balanced by
bytes, so they finish at about the same time.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Team:
    index: int = 0
    count: int = 1
    # How long a process that finished its share waits for the others (at the barriers below).
    wait_s: int = 3600

    @property
    def is_lead(self) -> bool:
        return self.index == 0

    def share(self, sizes: list) -> list:
        """Indices into `sizes` (bytes per work item) this process converts, in their order: every item
        goes, largest first, to the process with the fewest bytes so far (ties to the lower index), the
        same on every process."""
        loads, owner = [0] * self.count, [0] * len(sizes)
        for item in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            owner[item] = min(range(self.count), key=lambda p: (loads[p], p))
            loads[owner[item]] += sizes[item]
        return [i for i in range(len(sizes)) if owner[i] == self.index]

    def barrier(self, name: str) -> None:
        """Returns once every process got here (up to `wait_s`)."""
        if self.count > 1:
            from orbax.checkpoint import multihost

            multihost.get_barrier_sync_fn()(key=name, timeout_ms=self.wait_s * 1000)

    def lead_value(self, value):
        """Process 0's `value` (JSON data), on every process."""
        if self.count == 1:
            return value
        from mesh.processes import allgather_json

        return allgather_json(value)[0]


SOLO = Team()
