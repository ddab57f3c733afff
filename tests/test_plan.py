"""plan.py on a small config and 8 emulated devices: the compiled memory and FLOPs against the
analytic model, the collectives it finds, the depth extrapolation against a fully unrolled program,
and a mesh that cannot fit reported as such. The compiles take minutes on 2 cores, so those tests
are `slow`; the extrapolation's bookkeeping is checked without compiling in the default set."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax._src import compilation_cache as jax_compilation_cache

from configs import optimizer, parallelism, tiny
from model.args import from_config
from planner import extrapolate, measure, memory, search
from planner.program import compile_lowered, compile_step
from trainer.optimizer import run_optimizer
from trainer.sharded_init import build_mesh

import plan

LAYERS = 9  # groups: 2 sliding (hash), 1 CSA (hash), then 3 x (HCA, CSA) score-routed


def small_config():
    config = tiny.get_config()
    config.model.num_layers = LAYERS
    config.model.compress_ratios = tiny.compress_ratios(LAYERS, first=0)
    config.mesh = parallelism.get_config("cm384-8", fsdp=4, expert=2)
    config.data.global_batch_size, config.data.seq_len = 8, 128
    config.optimizer = optimizer.get_config("adamw", learning_rate=1e-3, warmup_steps=0)
    return config


def test_variants_and_combination():
    """Variants repeat exactly one group once more; the combination scales each group's increment by
    its remaining repeats."""
    args = from_config(small_config().model)
    plan_variants = dict(extrapolate.variants(args))
    assert plan_variants == {"base": (1, 1, 1), "group0": (2, 1, 1), "group2": (1, 1, 2)}
    assert [extrapolate.with_repeats(args, r).num_layers for r in plan_variants.values()] == [4, 5, 6]
    base = extrapolate.with_repeats(args, (1, 1, 1))
    assert base.compress_ratios == (0, 4, 128, 4, 0) and base.num_hash_layers == 2 and not base.scan_layers
    measured = {
        "base": {"flops": 100.0, "x": 1.0},
        "group0": {"flops": 110.0, "x": 1.0},
        "group2": {"flops": 130.0, "x": 3.0, "y": 2.0},
    }
    # full depth: sliding pair x2 (+1 x 10), (HCA, CSA) x3 (+2 x 30); "y" appears only with more layers
    assert extrapolate.combine(args, measured) == {"flops": 170.0, "x": 5.0, "y": 4.0}


def test_variants_keep_named_kinds_and_their_ratios():
    """A schedule whose kinds are named (attention_kinds, CSA at 8 and HCA at 16): every variant
    layer keeps its kind and that kind's ratio."""
    config = small_config()
    ratios = {0: 0, 4: 8, 128: 16}
    config.model.compress_ratios = tuple(ratios[r] for r in config.model.compress_ratios)
    config.model.attention_kinds = tuple({0: "sliding", 8: "csa", 16: "hca"}[r] for r in config.model.compress_ratios)
    args = from_config(config.model)
    base = extrapolate.with_repeats(args, (1, 1, 1))
    assert base.compress_ratios == (0, 8, 16, 8, 0)
    assert base.attention_kinds == ("sliding", "csa", "hca", "csa", "sliding")
    from_config(dataclasses.asdict(base) | {"rope_scaling": dataclasses.asdict(base.rope_scaling)})


@pytest.fixture(scope="module")
def report():
    return plan.make_plan(small_config(), full_compile=True, log=lambda _: None, peak_buffers=8)


LIVE_RANGE_EXCERPT = """HloLiveRange (max 9):
  Live ranges at 5 (peak):
    copy.1{}: 3706716160 bytes (cumulative: 3706716160 bytes)
    while.7{2}: 1000 bytes (cumulative: 3706717160 bytes)
    param.12{4}: 11237588992 bytes (cumulative: 14944306152 bytes)
    fusion.3{}: 11237588992 bytes (cumulative: 26181895144 bytes)
    convert.9{}: 2445814848 bytes (cumulative: 28627709992 bytes)
  Live ranges at 6:
    copy.2{}: 5 bytes
  Stack trace breakdown for peak usage: 28 627 709 992 bytes
    main.3218_spmd (100.0%, total: 28 627 709 992 bytes, current: 0 bytes, remaining: 28 627 709 992 bytes)
"""
# param.12{4}, a loop body's parameter, shares fusion.3's buffer; while.7{2} is not listed (a buffer of its own).
ASSIGNMENT_EXCERPT = """BufferAssignment:
allocation 0: size 3706716160, parameter 0, shape |bf16[4,7168]| at ShapeIndex {}, maybe-live-out:
 value: <11 copy.1 @0> (size=3706716160,offset=0): bf16[4,7168]{1,0}
allocation 1: size 13683403840, preallocated-temp:
 value: <12 param.12{4} (phi) @0> (size=11237588992,offset=0): f32[8,7168]{1,0}
 value: <13 fusion.3 @0> (size=11237588992,offset=0): f32[8,7168]{1,0}
 value: <14 convert.9 @0> (size=2445814848,offset=11237588992): f32[8,7168]{1,0}
"""
HLO_EXCERPT = """HloModule jit_step
%fused_computation.4 (param_0: bf16[8,7168]) -> f32[8,7168] {
  %param_0 = bf16[8,7168]{1,0} parameter(0)
  ROOT %dot.5 = f32[8,7168]{1,0} dot(%param_0, %param_0), metadata={op_name="jit(step)/while/body/closed_call/transpose(jvp(bsd,dv->bsv))/dot_general"}
}
ENTRY %main.3218_spmd (p: bf16[8,7168]) -> f32[] {
  %copy.1 = bf16[4,7168]{1,0} copy(%p)
  %while.7 = (s32[], f32[2]{0}, /*index=2*/f32[384,80,7168]{2,1,0}) while(%t), condition=%c, body=%b
  %fusion.3 = f32[8,7168]{1,0} fusion(%p), kind=kLoop, calls=%fused_computation.4
  ROOT %convert.9 = f32[8,7168]{1,0} convert(%x), metadata={op_name="jit(step)/while/body/closed_call/transpose(jvp())/while/body/closed_call/checkpoint/rematted_computation/mul"}
}
"""


def test_peak_buffers_are_read_from_the_live_range_dump():
    """The buffers alive at the peak, biggest first, each once however many values share it (XLA's own
    sum counts fusion.3's buffer twice), with its shape (a tuple's element) and the op that made it (a
    fusion's by its fused computation's root; none: the instruction's name), op paths without the
    wrappers every step has."""
    peak = memory.peak_buffers(LIVE_RANGE_EXCERPT, HLO_EXCERPT, ASSIGNMENT_EXCERPT, top=2)
    assert peak["bytes"] == 3_706_716_160 + 1000 + 11_237_588_992 + 2_445_814_848
    assert peak["buffers"] == [
        {"what": "loop/transpose(jvp(bsd,dv->bsv))/dot_general", "shape": "f32[8,7168]", "bytes": 11_237_588_992},
        {"what": "copy.1", "shape": "bf16[4,7168]", "bytes": 3_706_716_160},
    ]
    buffers = memory.peak_buffers(LIVE_RANGE_EXCERPT, HLO_EXCERPT, ASSIGNMENT_EXCERPT, top=5)["buffers"]
    assert [b["what"] for b in buffers[2:]] == ["loop/transpose(jvp())/loop/remat/mul", "while.7"]
    assert buffers[-1]["shape"] == "f32[384,80,7168]"
    with pytest.raises(ValueError, match="no 'Live ranges at"):
        memory.peak_buffers("HloLiveRange (max 1):", HLO_EXCERPT, ASSIGNMENT_EXCERPT, top=1)


def test_a_dump_is_written_when_the_persistent_cache_holds_the_program(tmp_path):
    """The persistent cache (on for every test, tests/conftest.py) leaves XLA's dump options out of
    its key: a compile that dumps goes to XLA even when the program is cached, and the cache is used
    again after it."""
    backend = jax.extend.backend.get_backend()
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir

    def step(x):
        return jnp.tanh(x) @ x.T

    lowered = jax.jit(step).lower(jax.ShapeDtypeStruct((16, 16), jnp.float32))
    compile_lowered(lowered, {})
    assert jax_compilation_cache.is_cache_used(backend)
    for attempt in ("first", "second"):
        dump_dir = tmp_path / attempt
        compile_lowered(lowered, dict(memory.LIVE_RANGE_DUMP, xla_dump_to=str(dump_dir)))
        assert "(peak)" in memory.live_range_text(str(dump_dir))
    assert jax_compilation_cache.is_cache_used(backend)


@pytest.mark.slow
def test_peak_buffers_of_the_compiled_step(report):
    """The live-range dump of the full compile: its peak, each buffer once, is at most the compiled
    footprint (counting values, XLA's own sum came to 1.44x it), and the buffers listed are the
    largest alive then."""
    peak, compiled = report["memory_peak"], report["memory_compiled"]
    assert compiled["temporaries"] / 2 <= peak["bytes"] <= compiled["total"]
    sizes = [b["bytes"] for b in peak["buffers"]]
    assert len(sizes) == 8 and sizes == sorted(sizes, reverse=True) and sum(sizes) <= peak["bytes"]
    assert all(b["shape"] != "?" for b in peak["buffers"]), peak["buffers"]


@pytest.mark.slow
def test_memory_agrees_with_the_analytic_model(report):
    """Arguments are the train state (exact: weights, routing and optimizer shards) plus the batch;
    the whole compiled footprint lies within 3x of the analytic estimate (XLA:CPU keeps more
    temporaries alive than the shapes need; measured 2.3x on the tiny config)."""
    compiled, analytic = report["memory_compiled"], report["memory_analytic"]
    batch = 4 * 8 * 128 * 4 // 8  # four int32 [B, S] arrays split over the 8 token shards
    state = analytic["weights"] + analytic["optimizer"]
    assert state < compiled["arguments"] <= state + batch + 64  # + step counters, RNG key
    assert 0.5 < compiled["total"] / analytic["total"] < 3.0, (compiled, analytic)


@pytest.mark.slow
def test_flops_agree_with_the_analytic_model(report):
    """XLA counts every op the step runs (elementwise included, ~20% at width 64), the analytic model
    only what the architecture needs: measured 1.2-1.5 on this config."""
    assert 1.0 < report["flops_ratio"] < 1.6, report["flops_ratio"]


@pytest.mark.slow
def test_collectives_found(report):
    found = {(entry["kind"], tuple(entry["axes"])) for entry in report["collectives"]}
    assert ("all-to-all", ("expert",)) in found, found
    assert any(kind == "all-gather" and "fsdp" in axes for kind, axes in found), found
    assert all(entry["seconds"] > 0 for entry in report["collectives"])


@pytest.mark.slow
def test_cannot_fit_is_reported(report):
    assert report["fits"] is True  # cm384-8 devices have 64 GiB
    small = plan.make_plan(small_config(), full_compile=False, hbm_bytes=1 << 20, log=lambda _: None)
    assert small["fits"] is False and small["per_device_bytes"] > 1 << 20


@pytest.mark.slow
def test_extrapolation_equals_the_unrolled_full_depth():
    """FLOPs and collective bytes extrapolated from shallow variants equal the fully unrolled program's,
    up to XLA fusing ops differently across layer boundaries (measured 2.5e-4 of the FLOPs). The
    gradient all-reduces, which XLA combines into long tuples differently at each depth, included."""
    config = small_config()
    args = from_config(config.model)
    mesh = build_mesh(config.mesh)
    shape = dict(mesh.shape)

    def measured_on(variant):
        step = compile_step(variant, config, mesh, *run_optimizer(config, variant))
        return measure.measure(step.compiled, shape)

    measured = {
        name: measured_on(extrapolate.with_repeats(args, repeats)) for name, repeats in extrapolate.variants(args)
    }
    assert len(measured) == 3  # base, the sliding pair repeated, the (HCA, CSA) pair repeated
    unrolled = measured_on(dataclasses.replace(args, scan_layers=False))
    combined = extrapolate.combine(args, measured)
    assert set(combined) == set(unrolled)
    off = {
        key: (combined[key], value)
        for key, value in unrolled.items()
        if combined[key] != pytest.approx(value, rel=1e-3)
    }
    assert not off, off


def test_gradient_all_reduce_over_fsdp_is_costed_as_the_reduce_scatter_it_runs_as():
    """The CPU prints a gradient reduce-scatter over fsdp as an all-reduce whose result is the whole
    gradient; it costs what a reduce-scatter of that gradient costs (its HLO result: one shard), not
    `size` times more."""
    from mesh.layout import plan_layout
    from mesh.presets import get_topology
    from planner.estimate import collective_seconds

    layout = plan_layout(get_topology("cm384"), {"data": 3, "fsdp": 2, "expert": 128}, {})
    gradient = 2.0**30
    for axes, ways in ((("fsdp",), 2), (("fsdp", "expert"), 256)):
        as_all_reduce = collective_seconds("all-reduce", axes, gradient, layout)
        assert as_all_reduce == pytest.approx(collective_seconds("reduce-scatter", axes, gradient / ways, layout))


@pytest.mark.slow
def test_micro_batches_are_counted_every_pass(report):
    """Twice the report's batch in two micro-batches of its size: twice its model FLOPs, and twice its
    XLA FLOPs within 2% (the loop is unrolled for the count, not taken once), and the FSDP weight
    gathers made twice, once per micro-batch as the loop makes them (unrolled, XLA would merge them)."""
    config = small_config()
    config.data.global_batch_size *= 2
    config.train.microbatches = 2
    micro = plan.make_plan(config, full_compile=False, log=lambda _: None)
    assert micro["config"]["microbatches"] == 2 and micro["model_flops"] == 2 * report["model_flops"]
    assert micro["xla_flops"] == pytest.approx(2 * report["xla_flops"], rel=0.02)
    gathered = lambda r: sum(c["bytes"] for c in r["collectives"] if c["kind"] == "all-gather")
    assert gathered(micro) == pytest.approx(2 * gathered(report), rel=0.01)


@pytest.mark.slow
def test_search_compiles_the_best_candidate():
    """--search on 8 devices: the report is the compile of the best-ranked fitting mesh, with the
    ranking beside it."""
    report = plan.search_and_confirm(
        small_config(), full_compile=False, hbm_bytes=None, top=3, confirm=1, max_tensor=2, log=lambda _: None
    )
    best = report["search"]["candidates"][0]
    assert report["config"]["mesh"] == best["mesh"]
    assert report["config"]["expert_axes"] == (["data", "expert"] if best["experts_over_data"] else ["expert"])
    assert report["fits"] and report["search"]["confirmed"][0]["estimate"] == best
    shapes = search.mesh_shapes(8, 2)
    assert report["search"]["considered"] == sum(2 if s["data"] > 1 else 1 for s in shapes)
    assert report["search"]["smallest"]["topology"] == "cm384-8"  # a topology without smaller cuts
