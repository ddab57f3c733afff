"""Axis placement on levels: device order, locality of hungry axes, pins, errors."""

import re

import numpy as np
import pytest

from mesh import axes
from mesh.layout import plan_layout, resolve_sizes
from mesh.presets import get_topology


def ranks_along(layout, axis):
    """Groups of topology ranks that communicate along `axis` (all other coordinates fixed)."""
    position = layout.axis_names.index(axis)
    moved = np.moveaxis(layout.device_ids, position, -1)
    return moved.reshape(-1, moved.shape[-1])


def span(topology, group):
    """Levels at which members of a communicating group differ."""
    coords = [topology.coordinates(int(rank)) for rank in group]
    return {name for name in topology.level_names if len({c[name] for c in coords}) > 1}


CASES = [
    ("cm384-8", dict(data=1, fsdp=2, expert=2, tensor=2)),
    ("cm384-16", dict(data=2, fsdp=2, expert=2, tensor=2)),
    ("cm384-64", dict(fsdp=4, expert=8, tensor=2)),
    ("cm384", dict(expert=64, fsdp=12, tensor=1)),
    ("cm384", dict(expert=384, fsdp=2)),
    ("cm384:4", dict(data=4, expert=384, fsdp=2)),
    ("a2-cluster:4", dict(data=4, tensor=8)),
    ("cm384", dict(tensor=6, expert=128)),
]


@pytest.mark.parametrize("spec, sizes", CASES)
def test_device_order_is_a_permutation_and_levels_match(spec, sizes):
    topology = get_topology(spec)
    layout = plan_layout(topology, sizes)
    ids = layout.device_ids
    assert sorted(ids.ravel().tolist()) == list(range(topology.num_devices))
    for name in layout.axis_names:
        axis = layout.axis(name)
        assert int(np.prod([factor for _, factor in axis.factors])) == axis.size
        for group in ranks_along(layout, name)[:8]:
            assert span(topology, group) == set(axis.levels)


def test_tensor_stays_in_the_chip_and_expert_in_the_supernode():
    layout = plan_layout(get_topology("cm384:4"), dict(data=4, expert=96, fsdp=4, tensor=2))
    assert layout.axis("tensor").levels == ("chip",)
    assert "cluster" not in layout.axis("expert").levels
    assert "cluster" not in layout.axis("fsdp").levels
    assert layout.axis("data").levels == ("cluster",)
    assert layout.axis("tensor").bottleneck_bandwidth > layout.axis("expert").bottleneck_bandwidth


def test_larger_tensor_fills_the_server_before_leaving_it():
    layout = plan_layout(get_topology("cm384"), dict(tensor=16, fsdp=-1))
    assert layout.axis("tensor").levels == ("chip", "server")
    assert layout.axis("fsdp").levels == ("supernode",)


def test_pin_moves_fsdp_onto_the_die_pair():
    """ascend_topology.md 5.4: expert=384 x fsdp=2 with fsdp on the die pair."""
    topology = get_topology("cm384")
    free = plan_layout(topology, dict(expert=384, fsdp=2))
    assert free.axis("fsdp").levels == ("supernode",)
    pinned = plan_layout(topology, dict(expert=384, fsdp=2), pins=dict(fsdp="chip"))
    assert pinned.axis("fsdp").levels == ("chip",)
    assert pinned.axis("expert").levels == ("server", "supernode")
    assert pinned.device_ids[0, 0, :3, 0].tolist() == [0, 2, 4]  # (data, fsdp, expert, tensor)


def test_pin_outward_level():
    layout = plan_layout(get_topology("cm384-16"), dict(data=2, fsdp=4, tensor=2), pins=dict(fsdp="server"))
    assert layout.axis("fsdp").levels == ("server", "supernode")
    assert layout.axis("tensor").levels == ("chip",)
    assert layout.axis("data").levels == ("cluster",)


def test_full_size_v4_pro_layout_without_devices():
    """768 dies of one CM384, 384 routed experts: built as numbers and an AbstractMesh only."""
    layout = plan_layout(get_topology("cm384"), dict(data=1, expert=384, fsdp=2, tensor=1), pins=dict(fsdp="chip"))
    abstract = layout.abstract_mesh()
    assert dict(abstract.shape) == dict(data=1, fsdp=2, expert=384, tensor=1)
    for group in ranks_along(layout, "fsdp"):
        assert group[1] - group[0] == 1 and group[0] % 2 == 0  # the two dies of one 910C
    assert layout.axis("expert").bottleneck_bandwidth == get_topology("cm384").levels[1].bandwidth


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(fsdp=4, expert=4), "multiply to 16 but the topology has 8 devices"),
        (dict(fsdp=-1, expert=-1), "at most one axis may be -1"),
        (dict(fsdp=-1, expert=3), "multiply to 3, which does not divide 8 devices"),
        (dict(fsdp=0, expert=8), "must be positive"),
        (dict(model=8), "unknown mesh axes ['model']"),
    ],
)
def test_size_errors_name_the_numbers(sizes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_layout(get_topology("cm384-8"), sizes)


def test_pin_that_cannot_fit_names_the_free_capacity():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "after taking (supernode:2, cluster:2) a factor 2 is left that divides none of the "
            "free level capacities (supernode=1, cluster=1)"
        ),
    ):
        plan_layout(get_topology("cm384-16"), dict(data=2, expert=8), pins=dict(expert="supernode"))


def test_pin_to_unknown_level_lists_levels():
    with pytest.raises(ValueError, match="levels \\(inner -> outer\\): chip, server, supernode"):
        plan_layout(get_topology("cm384-8"), dict(fsdp=8), pins=dict(fsdp="rack"))


def test_resolve_sizes_orders_axes_outer_to_inner():
    assert list(resolve_sizes(dict(tensor=2, expert=2, fsdp=-1), 16)) == list(axes.CORE_AXES)


def test_mesh_needs_enough_devices():
    layout = plan_layout(get_topology("cm384-16"), dict(fsdp=-1))
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        layout.mesh()


def test_mesh_on_emulated_devices_follows_the_layout():
    import jax
    from jax.sharding import AxisType

    layout = plan_layout(get_topology("cm384-8"), dict(data=1, fsdp=2, expert=2, tensor=2))
    mesh = layout.mesh()
    assert [d.id for d in mesh.devices.flat] == layout.device_ids.ravel().tolist()
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert jax.device_count() == 8
