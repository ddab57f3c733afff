"""plan.py --search without compiling: the candidate meshes, why some are rejected, the memory of each
against the shard shapes of the real abstract train state, and the order of the ranking."""

import itertools

import pytest

from configs import optimizer, parallelism, tiny
from mesh.layout import plan_layout
from mesh.presets import get_topology, smaller_parts
from model.args import from_config
from planner import memory, search
from trainer.checkpointing import abstract_train_state
from trainer.optimizer import build_optimizer
from trainer.state import abstract_params

import plan

GIB = 2**30


def small_config(name="muon"):
    config = tiny.get_config()
    config.data.global_batch_size, config.data.seq_len = 8, 128
    config.optimizer = optimizer.get_config(name)
    return config


@pytest.fixture(scope="module", params=["muon", "adamw"])
def setup(request):
    config = small_config(request.param)
    args = from_config(config.model)
    tx = build_optimizer(config.optimizer, abstract_params(args))
    return config, args, tx, search.tensors(args, tx)


def test_mesh_shapes_are_every_factorisation():
    want = {
        (d, f, e, t)
        for d, f, e, t in itertools.product(range(1, 17), repeat=4)
        if d * f * e * t == 16 and t in (1, 2, 4)
    }
    got = {tuple(s[a] for a in ("data", "fsdp", "expert", "tensor")) for s in search.mesh_shapes(16, 4)}
    assert got == want


def test_rejections_name_the_reason(setup):
    config, args, _, table = setup
    topology = get_topology(config.mesh.topology)
    tensor4 = search.evaluate(
        search.Candidate(dict(data=2, fsdp=1, expert=1, tensor=4), False), args, config, topology, table, None
    )
    assert "o_groups" in tensor4.rejected and "not divisible by 4" in tensor4.rejected
    config = small_config()
    config.data.global_batch_size = 4
    batch = search.evaluate(
        search.Candidate(dict(data=1, fsdp=8, expert=1, tensor=1), False), args, config, topology, table, None
    )
    assert batch.rejected == "batch 4 does not split over 8 token shards"


@pytest.mark.parametrize(
    "shape,over_data",
    [
        (dict(data=1, fsdp=4, expert=2, tensor=1), False),
        (dict(data=2, fsdp=1, expert=4, tensor=1), True),
        (dict(data=2, fsdp=2, expert=1, tensor=2), False),
    ],
)
def test_state_memory_equals_the_abstract_train_state(setup, shape, over_data):
    """Weights, gradients and optimizer bytes per device from the rules alone equal the shard shapes of
    the train state plan.py compiles (trainer.checkpointing.abstract_train_state) on that mesh."""
    config, args, tx, table = setup
    topology = get_topology(config.mesh.topology)
    candidate = search.evaluate(search.Candidate(shape, over_data), args, config, topology, table, None)
    mesh = plan_layout(topology, shape).mesh()
    state = abstract_train_state(args, mesh, parallelism.rules(over_data), tx)
    want = memory.analytic_bytes(args, state, config.data.global_batch_size, config.data.seq_len, shape)
    for key in ("weights", "gradients", "optimizer", "activations"):
        assert candidate.memory[key] == want[key], key


def test_experts_over_data_trade_gradient_all_reduce_for_all_to_all(setup):
    """Spreading the routed experts over data divides their state by data, removes their gradient
    all-reduce over data, and widens the token all-to-all from 4 to 8 ranks."""
    config, args, _, table = setup
    topology = get_topology(config.mesh.topology)
    shape = dict(data=2, fsdp=1, expert=4, tensor=1)
    plain, spread = (
        search.evaluate(search.Candidate(shape, over), args, config, topology, table, None) for over in (False, True)
    )
    assert spread.memory["weights"] < plain.memory["weights"]
    assert spread.comm_s["all-reduce"] < plain.comm_s["all-reduce"]
    assert spread.comm_s["all-to-all"] > plain.comm_s["all-to-all"]


def test_ranking_puts_fitting_meshes_first_by_step_time(setup):
    config, args, _, table = setup
    topology = get_topology(config.mesh.topology)
    everything = search.search(args, config, topology, table, None)
    totals = sorted(c.memory["total"] for c in everything if not c.rejected)
    hbm = totals[len(totals) // 2]  # about half fit
    ranked = search.search(args, config, topology, table, hbm)
    status = [2 if c.rejected else 0 if c.fits else 1 for c in ranked]
    assert status == sorted(status) and 0 in status and 1 in status and 2 in status
    fitting = [c for c in ranked if c.fits and not c.rejected]
    assert all(c.memory["total"] <= hbm for c in fitting)
    times = [c.step_time_s for c in fitting]
    assert times == sorted(times)
    table = search.format_table(ranked, 3)
    assert table.splitlines()[0].startswith(f"search: {len(ranked)} candidate meshes")
    assert "rejected" in table


def test_apply_lays_the_config_out_as_the_candidate(setup):
    config = setup[0]
    candidate = search.Candidate(dict(data=2, fsdp=1, expert=4, tensor=1), True)
    laid_out = search.apply(config, candidate)
    assert dict(laid_out.mesh.axes) == dict(data=2, fsdp=1, expert=4, tensor=1)
    assert parallelism.expert_mesh_axes(laid_out.mesh.rules) == ("data", "expert")
    assert parallelism.expert_mesh_axes(config.mesh.rules) == ("expert",)  # the original is untouched


def test_smallest_topology_is_the_first_part_where_a_mesh_fits(setup):
    """With the HBM set to the least memory any mesh needs on 2 A2 servers, the smallest part of a
    4-server cluster that fits is those 2 servers (1 server needs more); below the least of all 4
    servers, none fits."""
    config, args, _, table = setup
    config = config.copy_and_resolve_references()
    config.data.global_batch_size = 32
    parts = [get_topology(spec) for spec in smaller_parts("a2-cluster:4")]
    least = [
        min(
            (c.memory["total"] for c in search.search(args, config, t, table, None, 2) if not c.rejected),
            default=float("inf"),
        )
        for t in parts
    ]  # 3 servers: 24 token shards never split 32 rows
    assert least[0] > least[1] > least[3] and least[2] == float("inf")
    topology, candidate = search.smallest_topology(args, config, parts, table, least[1], 2)
    assert topology.name == "a2-cluster:2" and candidate.fits and candidate.memory["total"] == least[1]
    assert search.smallest_topology(args, config, parts, table, least[3] - 1, 2) is None


def test_the_search_margin_shrinks_what_fits_and_a_confirmed_mesh_is_not_compiled_twice(setup):
    """plan.py's smallest part: with the HBM set to the least any 8-device mesh needs, that mesh fits
    at margin 1 and nothing fits at margin 1.01. When the config's own topology is the part found,
    the bytes of a report already compiled for that mesh are taken, not compiled again."""
    config, args, _, table = setup
    topology = get_topology(config.mesh.topology)
    viable = [c for c in search.search(args, config, topology, table, None, 2) if not c.rejected]
    least = min(c.memory["total"] for c in viable)
    found = plan.smallest_fitting_part(config, args, table, least, 2, full_compile=False, log=lambda _: None)
    assert found["topology"] == topology.name and found["analytic_bytes"] == least
    tight = plan.smallest_fitting_part(config, args, table, least, 2, False, lambda _: None, margin=1.01)
    assert tight is None
    confirmed = {
        "config": {"mesh": found["mesh"]},
        "search_estimate": {"experts_over_data": found["experts_over_data"]},
        "per_device_bytes": least / 2,
    }
    reused = plan.smallest_fitting_part(config, args, table, least, 2, True, lambda _: None, 1.0, [confirmed])
    assert reused["compiled_bytes"] == least / 2 and reused["fits"]
