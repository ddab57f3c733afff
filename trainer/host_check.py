"""Whether this host can run a config for real, checked before anything is allocated.

A CPU host emulates a topology's devices (mesh/emulate.py), which is how the tiny config and the
scaled twins train here; a full-size config would emulate its 768 dies and then try to hold its whole
train state in host memory. `check_host` refuses that up front, naming the topology, the devices it
needs and the memory it would take, and points at `--dry_run`, which compiles the same run for
abstract inputs instead. On accelerators (no emulation) it compares the devices JAX sees with the
topology's, and checks that they have the memory kinds the model uses (`check_memory_kinds`).
"""

import os

import jax

from configs.release import ConfigError
from mesh.topology import Topology
from model.args import OFFLOAD, ModelArgs
from model.summary import count_parameters
from model.remat import HOST_MEMORY

# float32 weights and gradients and at least one float32 optimizer moment per parameter.
MIN_STATE_BYTES_PER_PARAMETER = 12


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory_kinds(args: ModelArgs, device) -> None:
    """Raises ConfigError when the model keeps data in a memory kind `device` lacks: the layer
    inputs of remat_policy="offload" live in host memory."""
    if args.remat_policy != OFFLOAD:
        return
    kinds = [memory.kind for memory in device.addressable_memories()]
    if HOST_MEMORY not in kinds:
        raise ConfigError(
            f"config.model.remat_policy={OFFLOAD!r} keeps the layer inputs in memory kind "
            f"{HOST_MEMORY!r}, which {device.platform} devices lack (they have {kinds}); "
            f"use remat_policy='full'"
        )


def check_host(args: ModelArgs, topology: Topology, *, emulated: bool) -> None:
    """Raises ConfigError when this host cannot hold the run (see the module docstring). Emulated: call
    it before the devices are set up; else after (jax.devices() is what the run will use)."""
    needed = topology.num_devices
    if emulated:
        state = count_parameters(args)["total_params"] * MIN_STATE_BYTES_PER_PARAMETER
        host = host_memory_bytes()
        if state > host:
            raise ConfigError(
                f"topology {topology.name} needs {needed} devices and this host has none of them (a CPU host with "
                f"{os.cpu_count()} cores and {host / 2**30:.0f} GiB, which emulates devices only for runs whose train "
                f"state fits in its memory: this one needs at least {state / 2**30:,.0f} GiB): run it on the "
                f"cluster (--noemulate), or check the command here with --dry_run"
            )
        return
    check_memory_kinds(args, jax.devices()[0])
    present = jax.device_count()
    if present < needed:
        raise ConfigError(
            f"topology {topology.name} needs {needed} devices and this run sees {present} "
            f"({jax.devices()[0].platform}): run it where the topology is, or check the command "
            f"here with --dry_run"
        )
