"""Several processes, one global mesh: `jax.distributed` set up from flags or the launcher's environment.

Every process runs the same command; they differ only in the process id, read (first found wins) from
--process_id, JAX_PROCESS_ID, SLURM_PROCID or OMPI_COMM_WORLD_RANK (the count and coordinator alike).
Invariants: the setup happens before anything touches devices; a dead process (no heartbeats for
--heartbeat_timeout_s) makes every other one abort; a live process stuck outside the collectives is
bounded by --collective_timeout_s (gloo on CPU, HCCL_EXEC_TIMEOUT on Ascend). Where the values come
from and how each failure ends the run: docs/multihost.md.
"""

import contextlib
import dataclasses
import os

import jax
from absl import flags
from orbax.checkpoint import multihost

from configs.release import ConfigError
from mesh.emulate import emulate
from mesh.topology import Topology

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0's coordination service (multi-process runs); default: $JAX_COORDINATOR_ADDRESS.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    None,
    "Processes in the run; default: $JAX_NUM_PROCESSES, $SLURM_NTASKS, $OMPI_COMM_WORLD_SIZE, else 1.",
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "This process's id, 0 .. num_processes-1; default: $JAX_PROCESS_ID, $SLURM_PROCID, $OMPI_COMM_WORLD_RANK.",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_init_timeout_s",
    300,
    "Seconds to wait for every process to join, and at each `barrier` "
    "(e.g. for the slowest to compile the step), before failing.",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 60, "A process silent this long is dead, and all the others abort."
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_s", 60, "Seconds a finishing (or failing) process waits for the others to finish."
)
_COLLECTIVE_TIMEOUT = flags.DEFINE_integer(
    "collective_timeout_s",
    600,
    "Seconds a cross-process collective waits for a live peer that does not "
    "join it (stuck in host code) before it fails and the run stops; longer than any host-side work one "
    "process does while the others wait (a checkpoint write, an evaluation).",
)

COUNT_ENV = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
ID_ENV = ("JAX_PROCESS_ID", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS",)
XLA_FLAGS_ENV = "XLA_FLAGS"
CPU_COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
# How XLA:CPU's gloo collectives report the timeout above.
COLLECTIVE_TIMEOUT_MESSAGES = ("Timed out waiting",)


@dataclasses.dataclass(frozen=True)
class Processes:
    """Where this process stands in the run; `index`/`coordinator` None: JAX's cluster detection finds them."""

    count: int
    index: int | None
    coordinator: str | None
    init_timeout_s: int
    heartbeat_timeout_s: int
    shutdown_timeout_s: int
    collective_timeout_s: int


def _first(value, names, env, kind):
    if value is not None:
        return value
    for name in names:
        if env.get(name):
            return kind(env[name])
    return None


def from_flags(env=os.environ) -> Processes:
    """The run's processes from the flags above, else from `env`."""
    count = _first(_NUM_PROCESSES.value, COUNT_ENV, env, int) or 1
    index = _first(_PROCESS_ID.value, ID_ENV, env, int)
    if count == 1 and index not in (None, 0):
        raise ConfigError(f"process id {index} given for a single-process run; set --num_processes or {COUNT_ENV[0]}")
    return Processes(
        count,
        index,
        _first(_COORDINATOR.value, COORDINATOR_ENV, env, str),
        _INIT_TIMEOUT.value,
        _HEARTBEAT_TIMEOUT.value,
        _SHUTDOWN_TIMEOUT.value,
        _COLLECTIVE_TIMEOUT.value,
    )


def _bound_cpu_collectives(timeout_s: int, env=os.environ) -> None:
    """Adds the gloo collective timeout to XLA_FLAGS, read when the backend starts; a value the user
    put there already wins."""
    current = env.get(XLA_FLAGS_ENV, "")
    if CPU_COLLECTIVE_TIMEOUT_FLAG not in current:
        env[XLA_FLAGS_ENV] = f"{current} {CPU_COLLECTIVE_TIMEOUT_FLAG}={timeout_s}".strip()


def initialize(processes: Processes, topology: Topology | None, *, emulate_devices: bool) -> None:
    """Emulates this process's devices of `topology` (on a CPU host) and joins the other processes;
    call before any JAX computation or device query."""
    if emulate_devices:
        jax.config.update("jax_platforms", "cpu")
        emulate(topology, processes.count)
    if processes.count > 1:
        _bound_cpu_collectives(processes.collective_timeout_s)
        jax.distributed.initialize(
            processes.coordinator,
            processes.count,
            processes.index,
            initialization_timeout=processes.init_timeout_s,
            heartbeat_timeout_seconds=processes.heartbeat_timeout_s,
            shutdown_timeout_seconds=processes.shutdown_timeout_s,
        )


def barrier(name: str, processes: Processes) -> None:
    """Waits until every process gets here (up to the init timeout), through the coordination service.

    XLA:CPU's gloo collectives give every process only 30 s to reach a collective's first use, so
    processes that compile the same program at different speeds (one finds it in the compilation
    cache, or runs on a busier host) fail there with "Gloo context initialization failed". Compiling
    ahead and waiting here before the first run moves that wait to a barrier with a long timeout.
    """
    multihost.get_barrier_sync_fn()(key=name, timeout_ms=processes.init_timeout_s * 1000)


@contextlib.contextmanager
def collective_errors_named(processes: Processes):
    """Re-raises a collective's timeout as an error that says what it means and where to look."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if processes.count == 1 or not any(m in str(error) for m in COLLECTIVE_TIMEOUT_MESSAGES):
            raise
        raise RuntimeError(
            f"process {jax.process_index()} of {processes.count}: a cross-process collective waited longer "
            f"than --collective_timeout_s={processes.collective_timeout_s} s for another process, which is "
            f"stuck (alive, not joining) or gone; see the other processes' logs"
        ) from error


def is_primary() -> bool:
    """Process 0 writes what exists once per run: logs, progress lines, metrics.jsonl, TensorBoard."""
    return jax.process_index() == 0
