"""Host device emulation: in-process guards, and real 16 / 64 / 768 / 2048-device meshes in
subprocesses (this process is fixed at 8 devices by conftest)."""

import re
import subprocess
import sys
import textwrap

import jax
import pytest

from mesh.emulate import MAX_CPU_DEVICES_PER_PROCESS, emulate
from mesh.presets import get_topology

# Builds the layout's Mesh on emulated devices and sums one value per device along every axis,
# which fails unless each device of the topology exists and takes part.
SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from mesh.emulate import emulate
    from mesh.layout import plan_layout
    from mesh.presets import get_topology
    topology = get_topology(sys.argv[1])
    sizes = dict(item.split("=") for item in sys.argv[2].split(","))
    emulate(topology)
    layout = plan_layout(topology, {k: int(v) for k, v in sizes.items()})
    mesh = layout.mesh()
    assert [d.id for d in mesh.devices.flat] == layout.device_ids.ravel().tolist()
    ones = jnp.ones(mesh.devices.shape)
    total = jax.shard_map(lambda x: jax.lax.psum(x, mesh.axis_names), mesh=mesh,
                          in_specs=P(*mesh.axis_names), out_specs=P())(ones)
    print("devices", jax.device_count(), "sum", int(total.ravel()[0]))
""")


# The most one process can emulate: a CM384-like machine with 128 servers.
SPEC_2048 = "custom:chip=2@270e9,server=8@196e9,supernode=128@196e9"


@pytest.mark.parametrize(
    "spec, sizes, devices",
    [
        ("cm384-16", "data=2,fsdp=2,expert=2,tensor=2", 16),
        ("cm384-64", "fsdp=4,expert=8,tensor=2", 64),
        ("cm384", "expert=384,fsdp=2", 768),
        pytest.param(SPEC_2048, "expert=256,fsdp=8", 2048, marks=pytest.mark.slow),  # ~25 s
    ],
)
def test_emulated_topology_in_a_fresh_process(spec, sizes, devices):
    result = subprocess.run([sys.executable, "-c", SCRIPT, spec, sizes], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"devices {devices} sum {devices}" in result.stdout


def test_same_count_after_start_is_fine():
    assert jax.device_count() == 8  # starts the backend, as any earlier test may have
    assert emulate(get_topology("cm384-8")) == 8


def test_each_process_emulates_its_share():
    assert jax.device_count() == 8
    assert emulate(get_topology("cm384-16"), num_processes=2) == 8
    with pytest.raises(ValueError, match="do not split evenly over 3 processes"):
        emulate(get_topology("cm384-8"), num_processes=3)


def test_too_late_says_how_to_fix():
    assert jax.device_count() == 8
    with pytest.raises(RuntimeError, match=re.escape("JAX already started with 8 devices and 16 are needed")) as error:
        emulate(get_topology("cm384-16"))
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16" in str(error.value)


def test_beyond_one_process_explains_multi_process():
    with pytest.raises(ValueError) as error:
        emulate(get_topology("cm384:4"))
    message = str(error.value)
    assert "3072 devices" in message and str(MAX_CPU_DEVICES_PER_PROCESS) in message
    assert "--num_processes" in message


def test_2048_devices_mesh_without_computation():
    """The fast 2048 check: the CLI emulates the devices and builds the Mesh in the layout."""
    result = subprocess.run(
        [sys.executable, "-m", "mesh", f"--topology={SPEC_2048}", "--mesh=expert=256,fsdp=8", "--emulate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "over 2048 cpu devices; device ids follow the layout: True" in result.stdout
