"""The sharded post-training step against the single-device step, on several meshes.

Under SGD with momentum (an update linear in the gradient, momentum being the state ZeRO-1 splits
over data; lr 100 so the largest step, ~1e-2, is far above the float32 rounding of the parameters)
every tensor's step equals the single-device one to 1e-4 of its largest element (plus the rounding
of the new parameters) on every mesh, so a gradient reduced to the wrong scale over any axis (summed,
not averaged) fails: one small tensor's gradient (MTP's q_norm) tripled over data=3 still passes the
loss and gradient-norm checks, and fails this one. The meshes include data=3 x expert=4 on 12
emulated devices with the routed experts over data x expert (V4-Pro's factor 3 on a CM384), in its
own process (slow; the default set has the dispatch on that mesh, tests/test_expert_dispatch.py).
Loss to 1e-5 relative, gradient norm to 1e-4, routing biases exactly.

Muon (its update normalises the gradient's scale, which SGD checks): the whole step on
fsdp=2 x expert=2 x tensor=2 and with ZeRO-1 on data=4 x fsdp=2 (slow), and in the default set its
update of the model's parameters in their mesh shardings against the single-device update, per
tensor to 1e-4 of the largest step. Whole steps under Muon compare every element within 0.1 of a
step (lr) and the mean difference per tensor below 1e-3 of a step: AdamW (Muon's partner for the
non-matrix parameters) divides by |g|, so where a gradient is tiny (the MTP head's mixing weights:
~1e-6, summed with cancellation) the float32 noise of a different summation order (measured up to
4e-3 of that tensor's largest gradient) shows up in its normalised step. The compiled step must
show the collectives the layout implies (parameter all-gathers over fsdp, gradient reductions)."""

import functools
from typing import NamedTuple

import chex
import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import parallelism
from mesh import hlo_collectives
from mesh.axes import mesh_axes_of
from mesh.sharding import activate
from model.transformer import DeepSeekV4
from objectives.sft import SFT
from tests import emulated_run
from tests.model_configs import parity_args
from trainer.sharded_init import build_mesh
from trainer.state import TrainState, create_train_state, split_variables
from trainer.step import jit_train_step, make_train_step

LR = 1e-3
SGD_LR = 100.0
BATCH, SEQ = 16, 160
ZERO_MESH = dict(data=4, fsdp=2)
MESHES = [
    dict(fsdp=2, expert=2, tensor=2),
    ZERO_MESH,
    pytest.param(dict(fsdp=8), marks=pytest.mark.slow),
    pytest.param(dict(data=2, expert=4), marks=pytest.mark.slow),
]


def _args(**overrides):
    return parity_args(num_layers=4, compress_ratios=(0, 0, 4, 128, 0), **overrides)


SFT_OBJECTIVE = SFT(mtp_weight=optax.constant_schedule(0.3), bias_update_rate=1e-3)


def _train_config(**overrides):
    config = ml_collections.ConfigDict(dict(balance_weight=1e-4, microbatches=2))
    config.update(overrides)
    return config


def _batch(args, seed=0, rows=BATCH):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, args.vocab_size, (rows, SEQ)).astype(np.int32)
    mask = (rng.random((rows, SEQ)) < 0.7).astype(np.int32)
    return {
        "tokens": tokens,
        "loss_mask": mask,
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (rows, SEQ)).copy(),
    }


def _sgd():
    return optax.sgd(SGD_LR, momentum=0.9)


def _assert_params_close(ours, reference, lr=LR):
    chex.assert_trees_all_equal_structs(ours, reference)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(reference)):
        diff = np.abs(np.asarray(a) - b)
        assert diff.max() < 0.1 * lr, (jax.tree_util.keystr(path), diff.max())
        assert diff.mean() < 1e-3 * lr, (jax.tree_util.keystr(path), diff.mean())


def _assert_steps_equal(ours, reference, before):
    """Every tensor's step (parameters after - `before`) equals the reference's to 1e-4 of its largest
    element, plus the float32 spacing at the tensor's largest parameter (each side rounds its new
    parameters by up to half of it: a tensor whose gradient is ~1e-6 steps ~1e-4, where that
    rounding is ~1e-4 of the step); more than 80% of the tensors move (not the indexer, which the
    optimizer freezes at indexer_weight 0)."""
    chex.assert_trees_all_equal_structs(ours, reference, before)
    moved = 0
    for a, b, start in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), jax.tree.leaves(before)):
        step_reference = np.asarray(b) - start
        largest = np.abs(step_reference).max()
        rounding = np.spacing(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a) - start, step_reference, rtol=0, atol=1e-4 * largest + rounding)
        moved += bool(largest > 0)
    assert moved > 0.8 * len(jax.tree.leaves(reference)), moved


def _single_device_state(args, tx):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(DeepSeekV4(args, nnx.Rngs(0)))[1])()
    params, routing = split_variables(state)
    return graphdef, TrainState(
        step=np.zeros((), np.int32),
        params=params,
        opt_state=tx.init(params),
        routing=routing,
        rng=jax.random.key_data(jax.random.key(0)),
        nonfinite_steps=np.zeros((), np.int32),
    )


class Reference(NamedTuple):
    """One single-device step, on the host: the state before it, after it, and its metrics."""

    before: TrainState
    after: TrainState
    metrics: dict


def _single_device_step(args, tx, batch, lr) -> Reference:
    graphdef, state = _single_device_state(args, tx)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(lr), _train_config(), SFT_OBJECTIVE))
    new_state, metrics = step(state, batch)
    return Reference(*jax.device_get((state, new_state, metrics)))


@pytest.fixture(scope="module")
def sgd_reference():
    args = _args()
    batch = _batch(args)
    return args, batch, _single_device_step(args, _sgd(), batch, SGD_LR)


def _mesh_id(axes):
    return ",".join(f"{k}={v}" for k, v in axes.items())


@pytest.mark.parametrize("axes", MESHES, ids=_mesh_id)
def test_sharded_step_matches_single_device(sgd_reference, axes):
    """Under SGD every tensor's step equals the single-device one (module docstring); with `data` the
    optimizer state is split over it too (ZeRO-1)."""
    args, batch, reference = sgd_reference
    state = _check_sharded_step(
        args,
        batch,
        reference,
        parallelism.get_config("cm384-8", **axes),
        _sgd(),
        SGD_LR,
        functools.partial(_assert_steps_equal, before=reference.before.params),
    )
    if axes.get("data", 1) > 1:
        _assert_state_split_over_data(state)


def sgd_step_on_data3_expert4_with_experts_over_data():
    """Run by test_sharded_step_with_a_factor_3_of_experts_over_data on 12 emulated devices (cm384-12):
    24 routed experts, 2 per device; 24 rows, so each micro-batch of 12 rows is one per device."""
    args = _args(num_routed_experts=24)
    batch = _batch(args, rows=24)
    reference = _single_device_step(args, _sgd(), batch, SGD_LR)
    mesh_config = parallelism.get_config("cm384-12", experts_over_data=True, data=3, expert=4)
    _check_sharded_step(
        args,
        batch,
        reference,
        mesh_config,
        _sgd(),
        SGD_LR,
        functools.partial(_assert_steps_equal, before=reference.before.params),
    )


@pytest.mark.slow  # ~2.5 min: its own process compiles both steps; the default set has the dispatch on this mesh
def test_sharded_step_with_a_factor_3_of_experts_over_data():
    emulated_run.run("cm384-12", f"{__name__}:{sgd_step_on_data3_expert4_with_experts_over_data.__name__}")


def _check_sharded_step(args, batch, reference: Reference, mesh_config, tx, lr, compare, spreads_matrices=False):
    """-> the sharded step's initial state, after checking its loss, gradient norm and routing against
    the reference's and its parameters by `compare(ours, reference's)`. `spreads_matrices`: tx is
    Muon, whose Newton-Schulz moves matrices by all-to-all over the axes that shard them
    (mesh/batch_spread.py), besides the dispatch's."""
    mesh = build_mesh(mesh_config)
    with activate(mesh, mesh_config.rules):
        graphdef, state, shardings = create_train_state(args, mesh, mesh_config.rules, tx, seed=0)
        step, _ = jit_train_step(
            make_train_step(graphdef, tx, optax.constant_schedule(lr), _train_config(), SFT_OBJECTIVE),
            shardings,
            mesh,
            mesh_config.rules,
        )
        compiled = step.lower(state, batch).compile()
        new_state, metrics = compiled(state, batch)
    expected = reference.metrics
    assert abs(float(metrics["loss"]) - expected["loss"]) < 1e-5 * abs(expected["loss"])
    assert abs(float(metrics["grad_norm"]) - expected["grad_norm"]) < 1e-4 * expected["grad_norm"]
    compare(new_state.params, reference.after.params)
    chex.assert_trees_all_equal(new_state.routing, reference.after.routing)
    experts = new_state.params["groups"][0]["blocks"][0]["moe"]["experts"]["w1"][...]
    assert experts.sharding.spec == shardings.params["groups"][0]["blocks"][0]["moe"]["experts"]["w1"].get_value().spec
    table = shardings.params["embed"].get_value().spec[1]  # [vocab, embed]
    _assert_collectives(
        compiled.as_text(),
        dict(mesh.shape),
        parallelism.expert_mesh_axes(mesh_config.rules),
        mesh_axes_of(table),
        spreads_matrices,
    )
    return state


def _assert_collectives(
    hlo: str, mesh_axes: dict, expert_axes: tuple, embed_axes: tuple, spreads_matrices: bool = False
):
    """The collectives the layout implies, with the mesh axes their replica groups span: token
    exchanges by all-to-all over the routed experts' axes `expert_axes`, and the embedding's over the
    table's `embed_axes` (model/embedding.py: 1.6% of the dispatch's bytes on fsdp=2,expert=2,tensor=2,
    6.2% on data=3 x expert=4); any other all-to-all (a partitioner reshuffle; none on those two meshes)
    under 5% of the dispatch's bytes; over `tensor`, the sequence-parallel gathers into the tensor
    regions (and all-to-alls between sequence and head shards, 9.3% of the dispatch's bytes there);
    parameters gathered over `fsdp`; gradients of parameters replicated over the batch axes reduced
    over them."""
    parsed = [(c, axes) for c in hlo_collectives.parse(hlo) if (axes := c.axes(mesh_axes))]  # () = no-op
    found = [(c.kind, axes) for c, axes in parsed]
    dispatch, embedding = (
        tuple(axis for axis in axes if mesh_axes.get(axis, 1) > 1) for axes in (expert_axes, embed_axes)
    )
    if dispatch:
        # The dispatch's and the embedding's exchanges; the partitioner may add small reshuffles over other axes.
        moved = {}
        for c, axes in parsed:
            if c.kind == "all-to-all":
                moved[axes] = moved.get(axes, 0) + c.bytes
        other = sum(nbytes for axes, nbytes in moved.items() if axes not in (dispatch, embedding, ("tensor",)))
        if spreads_matrices:
            assert other > 0, moved
        else:
            assert other < 0.05 * moved.get(dispatch, 0), moved
    for axis in ("fsdp", "tensor"):
        if mesh_axes.get(axis, 1) > 1:
            assert any(kind == "all-gather" and axis in spans for kind, spans in found), (axis, found)
    batch_axes = {axis for axis in ("data", "fsdp", "expert") if mesh_axes.get(axis, 1) > 1}
    reduced = set().union(*(spans for kind, spans in found if kind in ("all-reduce", "reduce-scatter")))
    assert batch_axes <= reduced, (batch_axes, found)


def _muon(args):
    """Muon for hidden matrices + AdamW for the rest, Newton-Schulz in float32 so the comparison sees
    summation order, not bf16 rounding; constant learning rate, no clipping. AdamW's eps is 1e-5:
    at 1e-8 a near-zero gradient element (an embedding row, an mHC scale) turns summation order into
    a step difference of up to 0.13 lr (its first update is g / (|g| + eps))."""
    from configs import optimizer
    from trainer.optimizer import build_optimizer
    from trainer.state import abstract_params

    config = optimizer.get_config(
        "muon",
        learning_rate=LR,
        warmup_steps=0,
        decay="constant",
        muon_ns_dtype="float32",
        adam_eps=1e-5,
        clip_grad_norm=0.0,
    )
    return build_optimizer(config, abstract_params(args))


def test_muon_update_on_a_mesh_matches_single_device():
    """Muon's update of the model's parameters (every matrix role, the layer and expert stacks, AdamW's
    share) from one fixed random gradient, in the train state's shardings on data=2 x expert=2 x
    tensor=2 (ZeRO-1 state over data, Newton-Schulz spread by all-to-all with the rules active),
    equals the same update on one device: every tensor's step to 1e-4 of its largest element."""
    args = _args()
    tx = _muon(args)
    mesh_config = parallelism.get_config("cm384-8", data=2, expert=2, tensor=2)
    mesh = build_mesh(mesh_config)

    def update(params, opt_state, grads):
        updates, _ = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates)

    with activate(mesh, mesh_config.rules):
        _, state, shardings = create_train_state(args, mesh, mesh_config.rules, tx, seed=0)
        rng = np.random.default_rng(0)
        grads = jax.tree.map(
            lambda p: jax.device_put(rng.normal(size=p.shape).astype(np.float32), p.sharding), state.params
        )
        sharded = jax.jit(update, out_shardings=shardings.params).lower(state.params, state.opt_state, grads).compile()
        ours = sharded(state.params, state.opt_state, grads)
    before, opt_state, grads = jax.device_get((state.params, state.opt_state, grads))
    _assert_steps_equal(ours, jax.jit(update)(before, opt_state, grads), before)
    assert "all-to-all" in sharded.as_text()


@pytest.mark.slow  # ~2 min; the default set has Muon's update on a mesh, and the step under SGD
def test_muon_sharded_step_matches_single_device(sgd_reference):
    args, batch, _ = sgd_reference
    tx = _muon(args)
    _check_sharded_step(
        args,
        batch,
        _single_device_step(args, tx, batch, LR),
        parallelism.get_config("cm384-8", fsdp=2, expert=2, tensor=2),
        tx,
        LR,
        _assert_params_close,
        spreads_matrices=True,
    )


def _assert_state_split_over_data(state):
    """Some moments are split over `data` (which replicates every parameter on data x fsdp) and every
    optimizer-state leaf's sharding still holds its parameter's axes."""
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim]
    assert any("data" in jax.tree.leaves(tuple(spec)) for spec in specs), specs
    assert all("data" not in jax.tree.leaves(tuple(leaf.sharding.spec)) for leaf in jax.tree.leaves(state.params))


@pytest.mark.slow  # ~4 min; the default set has ZeRO-1 under SGD here and Muon's update with ZeRO-1
def test_zero1_step_matches_single_device_muon(sgd_reference):
    """ZeRO-1: on data=4 x fsdp=2 the optimizer state is split over data too; the Muon step (matrices
    gathered for Newton-Schulz from data-split momentum) equals the single-device one."""
    args, batch, _ = sgd_reference
    tx = _muon(args)
    state = _check_sharded_step(
        args,
        batch,
        _single_device_step(args, tx, batch, LR),
        parallelism.get_config("cm384-8", **ZERO_MESH),
        tx,
        LR,
        _assert_params_close,
        spreads_matrices=True,
    )
    _assert_state_split_over_data(state)


def test_microbatches_sum_to_the_whole_batch(sgd_reference):
    """Two micro-batches accumulate the whole batch's gradient: same loss, gradient norm and, under SGD
    (whose update is the gradient), parameters; so does the loop unrolled as the planner compiles it
    (each micro-batch's weights tied to its tokens). AdamW would blur the check: its first update
    g / (|g| + eps) turns the rounding of a gradient near eps into a difference of the order of lr."""
    args, batch, _ = sgd_reference
    tx = optax.sgd(LR)
    runs = []
    for microbatches, unrolled in ((1, False), (2, False), (2, True)):
        graphdef, fresh = _single_device_state(args, tx)
        train_config = _train_config(microbatches=microbatches)
        step = jax.jit(
            make_train_step(graphdef, tx, optax.constant_schedule(LR), train_config, SFT_OBJECTIVE, unrolled)
        )
        runs.append(jax.device_get(step(fresh, batch)))
    (whole, whole_metrics), *micro_runs = runs
    for micro, micro_metrics in micro_runs:
        for key in ("loss", "grad_norm"):
            expected = float(whole_metrics[key])
            assert abs(float(micro_metrics[key]) - expected) < 1e-5 * abs(expected), key
        chex.assert_trees_all_close(micro.params, whole.params, rtol=0, atol=1e-5 * LR)  # gradients equal to 1e-5


def test_loss_falls_when_memorising_a_batch(sgd_reference):
    """Twenty AdamW steps on one batch lower its loss by more than 1."""
    args, batch, _ = sgd_reference
    tx = optax.adamw(LR)
    graphdef, state = _single_device_state(args, tx)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(LR), _train_config(), SFT_OBJECTIVE))
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["main_loss"]))
    assert losses[-1] < losses[0] - 1.0, losses


def test_bias_update_moves_load_toward_balance():
    """With the parameters fixed, raising the bias of under-loaded experts evens out the next load."""
    args = _args()
    model = DeepSeekV4(args, nnx.Rngs(0))
    tokens = _batch(args)["tokens"]
    graphdef, state = nnx.split(model)
    load_of = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens).moe.load)
    load = load_of(state)
    score_layers = np.array([not args.is_hash_layer(i) for i in range(args.num_layers)] + [True])

    def imbalance(l):
        l = np.asarray(l)[score_layers]
        return float(np.mean(l.max(-1) / l.mean(-1)))

    before = imbalance(load)
    for _ in range(10):  # a rate below the spread of the scores, or sign steps overshoot and oscillate
        model.update_routing_bias(load, rate=0.002)
        load = load_of(nnx.state(model))
    assert imbalance(load) < before - 0.15, (before, imbalance(load))  # measured 1.29 -> 1.04


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_state_is_sharded_like_the_parameters(name):
    """ZeRO: per device, AdamW holds two moments per parameter shard and Muon one momentum (plus AdamW's
    two for the non-matrix parameters): nothing beyond that is replicated (was 8-15x the parameters
    when the state took the compiled init's replicated output shardings)."""
    from configs import optimizer, tiny
    from model.args import from_config
    from planner.memory import shard_bytes
    from trainer.checkpointing import abstract_train_state
    from trainer.optimizer import build_optimizer
    from trainer.state import abstract_params

    config = tiny.get_config()
    args = from_config(config.model)
    tx = build_optimizer(optimizer.get_config(name), abstract_params(args), train_indexer=True)  # every parameter
    state = abstract_train_state(args, build_mesh(config.mesh), config.mesh.rules, tx)
    ratio = shard_bytes(state.opt_state) / shard_bytes(state.params)
    assert {"adamw": 1.99, "muon": 1.0}[name] < ratio < {"adamw": 2.05, "muon": 1.3}[name], ratio
