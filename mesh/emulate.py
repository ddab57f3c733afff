"""Make a CPU host pretend to be a topology: one host device per topology device.

With several processes (trainer/distributed.py) each emulates an equal share of the devices, in
rank order: process p holds ranks [p * n, (p + 1) * n), e.g. one server of cm384-8 each for two.

JAX reads the host device count once, when its backend starts, so this must run before the first
JAX computation (or `jax.devices()`); afterwards we can only check and explain.
"""

import jax

from mesh.topology import Topology

# One process can emulate at most 2048 CPU devices; beyond that the first computation fails with
# "Multiprocess computations aren't implemented on the CPU backend" (jax_cpu_notes.md, surprise 2).
MAX_CPU_DEVICES_PER_PROCESS = 2048


def emulate(topology: Topology, num_processes: int = 1) -> int:
    """Sets this process's CPU device count to its share of the topology's devices; returns that count.

    Fine to call again once the backend runs, as long as the count already matches.
    """
    if topology.num_devices % num_processes:
        raise ValueError(
            f"topology {topology.name!r} has {topology.num_devices} devices, which do not "
            f"split evenly over {num_processes} processes"
        )
    needed = topology.num_devices // num_processes
    if needed > MAX_CPU_DEVICES_PER_PROCESS:
        raise ValueError(
            f"topology {topology.name!r} has {topology.num_devices} devices, {needed} per process over "
            f"{num_processes}, more than the {MAX_CPU_DEVICES_PER_PROCESS} one CPU process can emulate. "
            f"Run more processes (train.py --num_processes, see trainer/distributed.py), e.g. one "
            f"supernode each; then jax.devices() lists all of them and Layout.mesh() works unchanged. "
            f"Layouts and costs need no devices at all: use plan_layout / Layout.abstract_mesh()."
        )
    try:
        jax.config.update("jax_num_cpu_devices", needed)
    except RuntimeError:
        have = jax.local_device_count()
        if have != needed:
            raise RuntimeError(
                f"too late to emulate {topology.name!r}: JAX already started with {have} devices "
                f"and {needed} are needed. Call mesh.emulate.emulate() right after `import jax`, "
                f"before any JAX operation, or start Python with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}"
            ) from None
    return needed
