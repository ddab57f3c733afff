"""Make a CPU host pretend to be a topology: one host device per topology device.

JAX reads the host device count once, when its backend starts, so this must run before the first
JAX computation (or `jax.devices()`); afterwards we can only check and explain.
"""
import jax

from mesh.topology import Topology

# One process can emulate at most 2048 CPU devices; beyond that the first computation fails with
# "Multiprocess computations aren't implemented on the CPU backend" (jax_cpu_notes.md, surprise 2).
MAX_CPU_DEVICES_PER_PROCESS = 2048


def emulate(topology: Topology) -> int:
    """Sets the CPU device count to the topology's device count; returns that count.

    Fine to call again once the backend runs, as long as the count already matches.
    """
    needed = topology.num_devices
    if needed > MAX_CPU_DEVICES_PER_PROCESS:
        raise ValueError(
            f"topology {topology.name!r} has {needed} devices, more than the "
            f"{MAX_CPU_DEVICES_PER_PROCESS} one CPU process can emulate. Run several processes, "
            f"each with jax_num_cpu_devices={MAX_CPU_DEVICES_PER_PROCESS} or fewer (e.g. one "
            f"supernode each), joined by jax.distributed.initialize(coordinator, num_processes, "
            f"process_id); then jax.devices() lists all of them and Layout.mesh() works unchanged. "
            f"Layouts and costs need no devices at all: use plan_layout / Layout.abstract_mesh().")
    try:
        jax.config.update("jax_num_cpu_devices", needed)
    except RuntimeError:
        have = jax.device_count()
        if have != needed:
            raise RuntimeError(
                f"too late to emulate {topology.name!r}: JAX already started with {have} devices "
                f"and {needed} are needed. Call mesh.emulate.emulate() right after `import jax`, "
                f"before any JAX operation, or start Python with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={needed}") from None
    return needed
