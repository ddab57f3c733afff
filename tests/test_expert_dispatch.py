"""The sorted expert-parallel dispatch (model/expert_dispatch.py) against a per-expert loop reference,
and the model's dense reference (`moe_dispatch="dense"`, model/moe.py) against the dispatch.

The loop is the maths of `RoutedExperts.dense` written expert by expert: every (token, expert)
choice adds weight * clamped_swiglu(x@w1[e], x@w3[e]) @ w2[e]. All in float32, so outputs and
gradients must agree to float32 rounding (TOL) on every mesh, up to the order of the sums. The
meshes are the 8 test devices', and data=3 x expert=4 on 12 (cm384-12, in its own process).
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from configs.parallelism import RULES, rules
from mesh import hlo_collectives
from mesh.sharding import activate
from model import expert_dispatch
from model.expert_dispatch import capacity, routed_experts
from model.grouped_mlp import tile_flops
from model.moe import Routing, RoutedExperts, clamped_swiglu
from tests import emulated_run
from tests.model_configs import tiny_args

TOKENS, WIDTH, HIDDEN, EXPERTS, TOP_K = 64, 16, 8, 8, 2
LIMIT = 1.0  # low enough that the clamp is active for some rows
DUPLICATES = 8  # tokens whose two choices are the same expert (hash routing can do this)
TOL = dict(rtol=2e-5, atol=2e-5)
TILE = 3  # rows per tile of the tiled expert MLP: smaller than, and not dividing, the buffers
MESH_NAMES = ("data", "fsdp", "expert", "tensor")
MESHES = {  # (data, fsdp, expert, tensor)
    "none": None,
    "fsdp8": (1, 8, 1, 1),
    "data2_expert4": (2, 1, 4, 1),
    "fsdp2_expert2_tensor2": (1, 2, 2, 2),
}


def make_mesh(shape):
    return jax.sharding.Mesh(
        np.array(jax.devices()).reshape(shape), MESH_NAMES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_NAMES)
    )


def problem(seed=0, skew=False, tokens=TOKENS, experts=EXPERTS):
    """x [t,d], experts [t,k] (distinct per token except DUPLICATES rows), weights [t,k], w1, w3, w2
    (`experts` of them). skew: half the tokens put expert 0 first (an imbalanced load)."""
    rng = np.random.default_rng(seed)
    chosen = np.stack([rng.permutation(experts)[:TOP_K] for _ in range(tokens)])
    chosen[rng.choice(tokens, DUPLICATES, replace=False), 1:] = chosen[:, :1][:DUPLICATES]
    if skew:
        hot = rng.random(tokens) < 0.5
        chosen[hot] = np.stack(
            [np.concatenate([[0], rng.permutation(np.arange(1, experts))[: TOP_K - 1]]) for _ in range(hot.sum())]
        )
    scale = 1 / math.sqrt(WIDTH)
    return dict(
        x=jnp.asarray(rng.normal(size=(tokens, WIDTH)), jnp.float32),
        experts=jnp.asarray(chosen, jnp.int32),
        weights=jnp.asarray(rng.uniform(0.1, 1.0, size=(tokens, TOP_K)), jnp.float32),
        w1=jnp.asarray(rng.normal(size=(experts, WIDTH, HIDDEN)) * 2 * scale, jnp.float32),
        w3=jnp.asarray(rng.normal(size=(experts, WIDTH, HIDDEN)) * 2 * scale, jnp.float32),
        w2=jnp.asarray(rng.normal(size=(experts, HIDDEN, WIDTH)) * scale, jnp.float32),
    )


def reference(x, experts, weights, w1, w3, w2):
    """Per-expert loop: y[t] = sum over choices (e, w) of w * clamped_swiglu(x@w1[e], x@w3[e]) @ w2[e]."""
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(w1.shape[0]):
        weight = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=1, keepdims=True)  # [t,1]
        h = clamped_swiglu(x @ w1[e], x @ w3[e], LIMIT) * weight
        y = y + h @ w2[e]
    return y


def run(p, mesh_shape, backend="padded", capacity_factor=None, grads=True, tile=0, mesh_rules=RULES):
    """(y, stats, grads w.r.t. x, weights, w1, w3, w2 of sum(y * cotangent)) from the dispatch."""
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=p["x"].shape), jnp.float32)

    def loss(x, weights, w1, w3, w2):
        y, stats = routed_experts(
            x,
            Routing(p["experts"], weights, None),
            w1,
            w3,
            w2,
            limit=LIMIT,
            backend=backend,
            capacity_factor=capacity_factor,
            tile=tile,
        )
        return jnp.sum(y * cotangent), (y, stats)

    args = (p["x"], p["weights"], p["w1"], p["w3"], p["w2"])
    fn = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True) if grads else loss)
    if mesh_shape is None:
        out = fn(*args)
    else:
        with activate(make_mesh(mesh_shape), mesh_rules):
            out = fn(*args)
    (_, (y, stats)), g = out if grads else (out, None)
    return y, stats, g


def reference_grads(p, weights=None):
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=p["x"].shape), jnp.float32)

    def loss(x, weights, w1, w3, w2):
        return jnp.sum(reference(x, p["experts"], weights, w1, w3, w2) * cotangent)

    weights = p["weights"] if weights is None else weights
    return jax.grad(loss, argnums=range(5))(p["x"], weights, p["w1"], p["w3"], p["w2"])


def assert_matches(p, y, g):
    np.testing.assert_allclose(y, reference(p["x"], p["experts"], p["weights"], p["w1"], p["w3"], p["w2"]), **TOL)
    for name, got, want in zip(("x", "weights", "w1", "w3", "w2"), g, reference_grads(p)):
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"grad w.r.t. {name}")


@pytest.mark.parametrize("tile", [0, TILE])
@pytest.mark.parametrize("mesh", MESHES)
def test_padded_dropless_matches_reference(mesh, tile):
    """Forward and all gradients equal the per-expert loop on every mesh (and with no mesh), with whole
    buffers or occupied tiles only; dropless drops nothing even with repeated choices; loads are
    counted over the global batch."""
    p = problem()
    y, stats, g = run(p, MESHES[mesh], tile=tile)
    assert_matches(p, y, g)
    distinct = {(t, e) for t, row in enumerate(np.asarray(p["experts"])) for e in row}
    loads = np.bincount([e for _, e in distinct], minlength=EXPERTS)
    assert float(stats["dropped_tokens"]) == 0
    assert float(stats["max_load"]) == loads.max()
    assert float(stats["mean_load"]) == pytest.approx(loads.mean())


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """lax.ragged_all_to_all's documented semantics from all_gather + scatter, for XLA:CPU, which lacks
    the HLO: slice i of sender s lands on device i // (K / n) at that sender's output_offsets[i]."""
    del recv_sizes
    n = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    per_device = input_offsets.shape[0] // n
    sources = lax.all_gather(operand, axis_name)  # [n, N, ...]
    starts, sizes, targets = (lax.all_gather(v, axis_name) for v in (input_offsets, send_sizes, output_offsets))
    rows = jnp.arange(operand.shape[0])
    for s in range(n):
        for j in range(per_device):
            i = me * per_device + j
            valid = (rows >= starts[s, i]) & (rows < starts[s, i] + sizes[s, i])
            where = jnp.where(valid, targets[s, i] + rows - starts[s, i], output.shape[0])
            output = output.at[where].set(sources[s], mode="drop")
    return output


@pytest.mark.parametrize("mesh", ["none", "fsdp2_expert2_tensor2"])
def test_ragged_matches_reference(mesh, monkeypatch):
    """The ragged backend's offsets and layouts: ragged_dot runs on CPU; the ragged all-to-all is
    replaced by an emulation of its documented semantics, since XLA:CPU cannot compile it."""
    monkeypatch.setattr(lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    monkeypatch.setattr(expert_dispatch, "ragged_all_to_all_supported", lambda platform: True)
    p = problem(seed=2, skew=True)
    y, stats, g = run(p, MESHES[mesh], backend="ragged")
    assert_matches(p, y, g)
    assert float(stats["dropped_tokens"]) == 0


def test_ragged_on_cpu_names_the_missing_op():
    with pytest.raises(NotImplementedError, match="ragged_all_to_all.*use backend='padded'"):
        run(problem(), MESHES["data2_expert4"], backend="ragged", grads=False)


@pytest.mark.parametrize("tile", [0, TILE])
def test_imbalanced_routing_stays_dropless(tile):
    """Every token sends its first choice to expert 0: the worst case for one expert, still exact."""
    p = problem(seed=3)
    p["experts"] = p["experts"].at[:, 0].set(0).at[:, 1].set(jnp.where(p["experts"][:, 1] == 0, 1, p["experts"][:, 1]))
    y, stats, g = run(p, MESHES["data2_expert4"], tile=tile)
    assert_matches(p, y, g)
    assert float(stats["dropped_tokens"]) == 0 and float(stats["max_load"]) == TOKENS


def test_bfloat16_computes_in_input_dtype():
    """bf16 x and weights: matmuls in bf16 with float32 accumulation, float32 output, close to the
    float32 reference at bf16 precision (8 mantissa bits, a few roundings per product)."""
    p = problem()
    low = {name: v.astype(jnp.bfloat16) if name in ("x", "w1", "w3", "w2") else v for name, v in p.items()}
    y, _, _ = run(low, MESHES["data2_expert4"], grads=False)
    assert y.dtype == jnp.float32
    f32 = {name: low[name].astype(jnp.float32) for name in ("x", "w1", "w3", "w2")}
    want = reference(f32["x"], p["experts"], p["weights"], f32["w1"], f32["w3"], f32["w2"])
    np.testing.assert_allclose(y, want, rtol=1e-2, atol=1e-2)  # measured max abs error 3e-3


def expected_kept(experts, shards, cap):
    """Independent capacity rule: in each contiguous shard of tokens, an expert keeps the first `cap`
    distinct (token, expert) choices in token order; a repeated choice rides on the first one."""
    experts = np.asarray(experts)
    kept = np.zeros(experts.shape, bool)
    per_shard = experts.shape[0] // shards
    for shard in range(shards):
        taken = np.zeros(EXPERTS, int)
        for t in range(shard * per_shard, (shard + 1) * per_shard):
            for slot, e in enumerate(experts[t]):
                if e in experts[t, :slot]:
                    kept[t, slot] = kept[t, list(experts[t]).index(e)]
                elif taken[e] < cap:
                    kept[t, slot], taken[e] = True, taken[e] + 1
    return kept


@pytest.mark.parametrize(
    "mesh,backend,tile",
    [
        ("none", "padded", 0),
        ("fsdp2_expert2_tensor2", "padded", 0),
        ("fsdp2_expert2_tensor2", "padded", TILE),
        ("fsdp2_expert2_tensor2", "ragged", 0),
    ],
)
def test_capacity_drops_exactly_what_it_reports(mesh, backend, tile, monkeypatch):
    """capacity_factor=1 on a skewed load: output = reference with exactly the independently computed
    dropped (token, expert) choices removed, and dropped_tokens counts them (ragged: emulated exchange)."""
    monkeypatch.setattr(lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    monkeypatch.setattr(expert_dispatch, "ragged_all_to_all_supported", lambda platform: True)
    p = problem(seed=4, skew=True)
    shape = MESHES[mesh]
    shards = 1 if shape is None else shape[0] * shape[1] * shape[2]  # act_batch -> (data, fsdp, expert)
    cap = capacity(TOKENS // shards, TOP_K, EXPERTS, 1.0)
    kept = expected_kept(p["experts"], shards, cap)
    distinct_dropped = sum(
        1 for t, slot in zip(*np.nonzero(~kept)) if p["experts"][t, slot] not in p["experts"][t, :slot]
    )
    assert distinct_dropped > 0
    y, stats, g = run(p, shape, backend=backend, capacity_factor=1.0, tile=tile)
    weights = jnp.where(kept, p["weights"], 0.0)
    np.testing.assert_allclose(y, reference(p["x"], p["experts"], weights, p["w1"], p["w3"], p["w2"]), **TOL)
    want = reference_grads(p, weights)
    np.testing.assert_allclose(g[0], want[0], **TOL)  # x
    np.testing.assert_allclose(g[2], want[2], **TOL)  # w1
    assert float(stats["dropped_tokens"]) == distinct_dropped


def test_a_tile_longer_than_the_capacity_runs_once_per_chunk():
    """capacity_factor=1 gives 4-row chunks; a 64-row tile shrinks to the chunk (grouped_mlp.chunk_tile):
    the output is the reference with the dropped choices removed, the tiles run are exactly the
    occupied (expert, source shard) chunks, once per tensor rank, and the compiled buffers are those of
    a tile as long as the chunk."""
    p = problem(seed=4, skew=True)
    shape = MESHES["fsdp2_expert2_tensor2"]
    shards, tensor = shape[0] * shape[1] * shape[2], shape[3]
    cap = capacity(TOKENS // shards, TOP_K, EXPERTS, 1.0)
    assert cap < 64
    kept = expected_kept(p["experts"], shards, cap)
    y, stats, _ = run(p, shape, capacity_factor=1.0, tile=64, grads=False)
    weights = jnp.where(kept, p["weights"], 0.0)
    np.testing.assert_allclose(y, reference(p["x"], p["experts"], weights, p["w1"], p["w3"], p["w2"]), **TOL)
    source = np.arange(TOKENS)[:, None] // (TOKENS // shards)
    chunks = {
        (int(s), int(e))
        for s, e, k in zip(np.broadcast_to(source, kept.shape).ravel(), np.asarray(p["experts"]).ravel(), kept.ravel())
        if k
    }
    assert float(stats["expert_tiles"]) == len(chunks) * tensor
    rows = capacity(FLOP_TOKENS // shards, TOP_K, EXPERTS, 1.0)  # chunk rows of compiled_forward's dispatch
    temporaries = lambda tile: compiled_forward(shape, 1.0, tile).memory_analysis().temp_size_in_bytes
    assert temporaries(rows + 36) == temporaries(rows)  # no chunk padded to the longer tile


# Widths for the compile-only checks: large enough that the swiglu's elementwise FLOPs (which the
# analytic 2*3*t*k*d*I leaves out) are small next to the matmuls.
FLOP_TOKENS, FLOP_WIDTH, FLOP_HIDDEN = 1024, 256, 128


def compiled_forward(mesh_shape, capacity_factor=None, tile=0, mesh_rules=RULES, tokens=FLOP_TOKENS, experts=EXPERTS):
    """The jitted dispatch compiled for abstract [tokens, FLOP_WIDTH] inputs and `experts` experts
    (nothing allocated)."""

    def forward(x, experts, weights, w1, w3, w2):
        return routed_experts(
            x, Routing(experts, weights, None), w1, w3, w2, limit=LIMIT, capacity_factor=capacity_factor, tile=tile
        )

    f32 = jnp.float32
    args = (
        jax.ShapeDtypeStruct((tokens, FLOP_WIDTH), f32),
        jax.ShapeDtypeStruct((tokens, TOP_K), jnp.int32),
        jax.ShapeDtypeStruct((tokens, TOP_K), f32),
        jax.ShapeDtypeStruct((experts, FLOP_WIDTH, FLOP_HIDDEN), f32),
        jax.ShapeDtypeStruct((experts, FLOP_WIDTH, FLOP_HIDDEN), f32),
        jax.ShapeDtypeStruct((experts, FLOP_HIDDEN, FLOP_WIDTH), f32),
    )
    if mesh_shape is None:
        return jax.jit(forward).lower(*args).compile()
    with activate(make_mesh(mesh_shape), mesh_rules):
        return jax.jit(forward).lower(*args).compile()


@pytest.mark.parametrize("tile", [0, TILE])
@pytest.mark.parametrize("mesh", ["data2_expert4", "data2_fsdp2_expert2"])
def test_experts_over_data_match_reference(mesh, tile):
    """Routed experts sharded over (data, expert): every device of data2_expert4 holds one expert, the
    tokens travel over data x expert, forward and gradients still equal the per-expert loop; the
    compiled all-to-alls span exactly (data, expert)."""
    check_experts_over_data({"data2_expert4": (2, 1, 4, 1), "data2_fsdp2_expert2": (2, 2, 2, 1)}[mesh], tile)


def check_experts_over_data(shape, tile=0, **sizes):
    """On the mesh (data, fsdp, expert, tensor) `shape` with the routed experts over (data, expert), a
    skewed `problem(**sizes)`'s forward and gradients equal the per-expert loop, nothing is dropped,
    and the compiled all-to-alls span exactly (data, expert)."""
    p = problem(seed=6, skew=True, **sizes)
    y, stats, g = run(p, shape, tile=tile, mesh_rules=rules(experts_over_data=True))
    assert_matches(p, y, g)
    assert float(stats["dropped_tokens"]) == 0
    text = compiled_forward(
        shape, tile=tile, mesh_rules=rules(experts_over_data=True), tokens=len(p["x"]), experts=len(p["w1"])
    ).as_text()
    spans = {c.axes(dict(zip(MESH_NAMES, shape))) for c in hlo_collectives.parse(text) if c.kind == "all-to-all"}
    assert spans == {("data", "expert")}, spans


def experts_over_data3_expert4():
    """Run by test_experts_over_a_factor_3_match_reference on 12 emulated devices (cm384-12): 12
    experts, one per device; 96 tokens, 8 per device."""
    check_experts_over_data((3, 1, 4, 1), TILE, tokens=96, experts=12)


def test_experts_over_a_factor_3_match_reference():
    """data=3 x expert=4, the routed experts over both: the expert-parallel size has a factor 3, as
    V4-Pro's data=3 x expert=128 on a CM384 (the whole step on this mesh: tests/test_train_step.py,
    slow)."""
    emulated_run.run("cm384-12", f"{__name__}:{experts_over_data3_expert4.__name__}")


def test_sharded_dispatch_uses_all_to_all():
    assert "all-to-all" in compiled_forward(MESHES["data2_expert4"]).as_text()
    assert "all-to-all" not in compiled_forward(MESHES["fsdp8"]).as_text()


def test_flop_ratio():
    """Executed forward FLOPs (XLA-counted per device x devices) / analytic 2*3*t*k*d*I. Dropless padded
    buffers hold C = t_local rows for every expert, so multiplying them whole does E/k times the useful
    work (as the dense reference does); capacity_factor=1 sizes them to the mean load and reaches ~1;
    the tiled MLP runs only occupied tiles: XLA counts its loop body once, so the executed count adds
    (tiles run - loops) x the FLOPs of one tile, with the tiles the dispatch reports."""
    useful = 2 * 3 * FLOP_TOKENS * TOP_K * FLOP_WIDTH * FLOP_HIDDEN
    devices = len(jax.devices())
    mesh = MESHES["data2_expert4"]
    dropless = compiled_forward(mesh).cost_analysis()["flops"] * devices / useful
    capped = compiled_forward(mesh, 1.0).cost_analysis()["flops"] * devices / useful
    tile = 8  # ~32 rows per (expert, source) chunk here; a chunk wastes half a tile on average
    rng = np.random.default_rng(5)
    experts = np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(FLOP_TOKENS)])
    inputs = (
        jnp.asarray(rng.normal(size=(FLOP_TOKENS, FLOP_WIDTH)), jnp.float32),
        jnp.asarray(experts, jnp.int32),
        jnp.full((FLOP_TOKENS, TOP_K), 0.5, jnp.float32),
        *(
            jnp.zeros(shape, jnp.float32)
            for shape in [(EXPERTS, FLOP_WIDTH, FLOP_HIDDEN)] * 2 + [(EXPERTS, FLOP_HIDDEN, FLOP_WIDTH)]
        ),
    )
    compiled = compiled_forward(mesh, tile=tile)
    tiles = float(compiled(*inputs)[1]["expert_tiles"])
    per_tile, _ = tile_flops(tile, FLOP_WIDTH, FLOP_HIDDEN, jnp.float32, LIMIT)
    tiled = (compiled.cost_analysis()["flops"] * devices + (tiles - devices) * per_tile) / useful
    print(
        f"forward flop ratio on data2_expert4: dropless {dropless:.3f}, capacity_factor=1 {capped:.3f}, "
        f"tiled dropless ({tile}-row tiles) {tiled:.3f}"
    )
    assert EXPERTS / TOP_K <= dropless < 1.05 * EXPERTS / TOP_K
    assert capped < 1.05
    assert 1.0 <= tiled < 1.2


EXPERTS_WHOLE = tuple((name, None) if name == "expert_mlp" else (name, target) for name, target in RULES)


@pytest.mark.parametrize("tile", [0, TILE])
@pytest.mark.parametrize(
    "mesh_rules, expected",
    [
        (RULES, {"all-gather", "reduce-scatter"}),
        (EXPERTS_WHOLE, {"all-gather", "reduce-scatter", "all-reduce"}),
    ],
    ids=["experts split over tensor", "experts whole on every tensor rank"],
)
def test_sequence_parallel_tokens_gather_and_reduce_scatter_over_tensor(tile, mesh_rules, expected):
    """Tokens as [b, s, d] split over tensor along s (the model's sequence-parallel layout): the
    dispatch equals the reference, forward and gradients. Over tensor: the tokens are all-gathered in
    (their gradient reduce-scattered back); experts split over tensor reduce-scatter their partial
    outputs, with no all-reduce at all; whole experts keep each rank's share of their output, and
    only their weights' gradients (replicated over tensor) are all-reduced."""
    p = problem(seed=3)
    rows, mesh_shape = 4, MESHES["fsdp2_expert2_tensor2"]
    as_rows = lambda a: a.reshape(rows, TOKENS // rows, *a.shape[1:])
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(TOKENS, WIDTH)), jnp.float32)

    def loss(x, weights, w1, w3, w2):
        y, _ = routed_experts(
            as_rows(x), Routing(as_rows(p["experts"]), as_rows(weights), None), w1, w3, w2, limit=LIMIT, tile=tile
        )
        assert y.shape == (rows, TOKENS // rows, WIDTH)
        return jnp.sum(y.reshape(TOKENS, WIDTH) * cotangent), y.reshape(TOKENS, WIDTH)

    args = (p["x"], p["weights"], p["w1"], p["w3"], p["w2"])
    with activate(make_mesh(mesh_shape), mesh_rules):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True)).lower(*args).compile()
        (_, y), g = compiled(*args)
    assert_matches(p, y, g)
    over_tensor = {
        c.kind
        for c in hlo_collectives.parse(compiled.as_text())
        if c.axes(dict(zip(MESH_NAMES, mesh_shape))) == ("tensor",)
    }
    assert over_tensor == expected, over_tensor


@pytest.mark.parametrize("mesh", ["none", "data2_expert4"])
def test_dense_reference_equals_the_dispatch(mesh):
    """The model's routed experts with `moe_dispatch="dense"` (every expert on every token, a combine
    matrix keeping each token's choices) and "padded" (the sorted dispatch) give the same output and
    gradients (input, routing weights, expert weights) for the same weights and routing."""
    p = problem(seed=7, skew=True)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=p["x"].shape), jnp.float32)

    def forward_and_grads(dispatch):
        args = tiny_args(
            hidden_size=WIDTH,
            moe_intermediate_size=HIDDEN,
            num_routed_experts=EXPERTS,
            num_experts_per_tok=TOP_K,
            swiglu_limit=LIMIT,
            moe_dispatch=dispatch,
        )
        graphdef, state = nnx.split(RoutedExperts(args, nnx.Rngs(0)))
        for name in ("w1", "w3", "w2"):
            state[name].set_value(p[name])

        def loss(state, x, weights):
            y, _, _ = nnx.merge(graphdef, state)(x, Routing(p["experts"], weights, None))
            return jnp.sum(y * cotangent), y

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        if MESHES[mesh] is None:
            return fn(state, p["x"], p["weights"])
        with activate(make_mesh(MESHES[mesh]), RULES):
            return fn(state, p["x"], p["weights"])

    (_, dense), dense_grads = forward_and_grads("dense")
    (_, padded), padded_grads = forward_and_grads("padded")
    np.testing.assert_allclose(dense, padded, **TOL)
    chex.assert_trees_all_close(dense_grads, padded_grads, **TOL)
    assert len(jax.tree.leaves(dense_grads)) == 5
