"""Collective estimates: textbook ring figures on one level, hierarchy on several."""

import pytest

from mesh import cost
from mesh.layout import plan_layout
from mesh.presets import custom, get_topology

GIB = 2.0**30


def single_level_axis(size, bandwidth, latency=None):
    text = f"ring={size}@{bandwidth}" + (f"/{latency}" if latency else "")
    return plan_layout(custom(text), dict(fsdp=size)).axis("fsdp")


def test_one_level_matches_the_ring_formula():
    axis = single_level_axis(8, 100e9, 1e-6)
    assert cost.all_gather_seconds(axis, GIB) == pytest.approx(7 / 8 * GIB / 100e9 + 7e-6)
    assert cost.all_reduce_seconds(axis, GIB) == pytest.approx(2 * cost.all_gather_seconds(axis, GIB))
    assert cost.all_to_all_seconds(axis, GIB) == pytest.approx(7 / 8 * GIB / 100e9 + 1e-6)


def test_size_one_axis_is_free():
    layout = plan_layout(get_topology("cm384-8"), dict(data=1, fsdp=8))
    assert cost.axis_costs(layout.axis("data"), GIB) == dict.fromkeys(cost.COLLECTIVES, 0.0)


def test_hierarchy_sends_only_small_pieces_over_roce():
    """data=4 over RoCE moves 3/4 of the bytes over 25 GB/s; under a UB axis it moves 1/768 x 3/4."""
    topology = get_topology("cm384:4")
    layout = plan_layout(topology, dict(data=4, expert=384, fsdp=2))
    data, expert = layout.axis("data"), layout.axis("expert")
    roce = topology.levels[-1].bandwidth
    assert cost.all_gather_seconds(data, GIB) == pytest.approx(3 / 4 * GIB / roce)
    flat = plan_layout(topology, dict(fsdp=-1)).axis("fsdp")  # one 3072-way fsdp axis
    roce_part = 3 * GIB / 3072 / roce
    assert cost.all_gather_seconds(flat, GIB) > roce_part
    assert cost.all_gather_seconds(flat, GIB) < cost.all_gather_seconds(data, GIB)
    assert cost.all_to_all_seconds(expert, GIB) < cost.all_to_all_seconds(data, GIB)


def test_fast_die_pair_beats_the_bus():
    topology = get_topology("cm384")
    on_pair = plan_layout(topology, dict(tensor=2, fsdp=-1)).axis("tensor")
    on_bus = plan_layout(topology, dict(tensor=2, fsdp=-1), pins=dict(tensor="server")).axis("tensor")
    assert (on_pair.levels, on_bus.levels) == (("chip",), ("server",))
    assert cost.all_reduce_seconds(on_pair, GIB) < cost.all_reduce_seconds(on_bus, GIB)
