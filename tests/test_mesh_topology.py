"""Topology presets: device counts, cited figures, spec parsing and its errors."""

import re

import pytest

from mesh import presets
from mesh.presets import get_topology

SOURCE_TAG = re.compile(r"\[(P|S|D)?:? ?[A-Za-z]")


@pytest.mark.parametrize(
    "spec, devices, levels",
    [
        ("atlas800t-a2", 8, ("server",)),
        ("a2-cluster:4", 32, ("server", "cluster")),
        ("cm384", 768, ("chip", "server", "supernode")),
        ("cm384:4", 3072, ("chip", "server", "supernode", "cluster")),
        ("cm384:4x32", 2048, ("chip", "server", "supernode", "cluster")),
        ("cm384:1x16", 256, ("chip", "server", "supernode")),
        ("cm384-8", 8, ("chip", "server", "supernode")),
        ("cm384-12", 12, ("chip", "server", "supernode")),
        ("cm384-16", 16, ("chip", "server", "supernode", "cluster")),
        ("cm384-64", 64, ("chip", "server", "supernode")),
    ],
)
def test_presets_have_the_hardware_shape(spec, devices, levels):
    topology = get_topology(spec)
    assert topology.num_devices == devices
    assert topology.level_names == levels
    assert topology.hbm_bytes and topology.peak_flops
    for level in topology.levels:
        assert SOURCE_TAG.search(level.source), f"{spec}/{level.name} cites no source"


def test_cm384_figures_match_the_topology_notes():
    chip, server, supernode, cluster = get_topology("cm384:2").levels
    assert (chip.size, server.size, supernode.size, cluster.size) == (2, 8, 48, 2)
    assert chip.bandwidth > server.bandwidth == supernode.bandwidth > cluster.bandwidth
    assert server.latency < supernode.latency


def test_rank_coordinates_put_die_pairs_on_consecutive_ranks():
    topology = get_topology("cm384")
    assert topology.coordinates(0) == {"chip": 0, "server": 0, "supernode": 0}
    assert topology.coordinates(1) == {"chip": 1, "server": 0, "supernode": 0}
    assert topology.coordinates(16) == {"chip": 0, "server": 0, "supernode": 1}


def test_custom_levels_from_text():
    topology = get_topology("custom:chip=2@270e9,server=8@196e9/1.2e-6,cluster=4@25e9")
    assert topology.num_devices == 64
    assert topology.levels[1].latency == pytest.approx(1.2e-6)
    assert topology.levels[2].latency is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cm999", "valid: atlas800t-a2"),
        ("a2-cluster", "needs ':<number of A2 servers>'"),
        ("a2-cluster:x", "positive integer"),
        ("cm384-8:2", "takes no ':' argument"),
        ("cm384:2x49", "1..48 servers, got 49"),
        ("cm384:2x", "positive integer"),
        ("custom:chip=2", "expected name=size@bandwidth"),
        ("custom:chip=2@270e9,chip=2@1e9", "level names repeat"),
    ],
)
def test_bad_specs_say_what_is_valid(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_topology(spec)


def test_every_preset_is_listed_in_the_error():
    with pytest.raises(ValueError) as error:
        get_topology("nope")
    for name in presets.PRESETS:
        assert name in str(error.value)


@pytest.mark.parametrize("spec, count", [("cm384", 48), ("cm384:2x3", 9), ("a2-cluster:3", 3), ("cm384-8", 1)])
def test_smaller_parts_grow_to_the_whole_topology(spec, count):
    """Every cut of the machine, smallest first, up to (and ending with) its own device count."""
    parts = [get_topology(part) for part in presets.smaller_parts(spec)]
    devices = [t.num_devices for t in parts]
    assert len(parts) == count and devices == sorted(devices)
    assert devices[-1] == get_topology(spec).num_devices and devices[0] == min(devices)
