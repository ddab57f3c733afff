"""The sharded post-training step against the single-device step, on several meshes.

Tolerances: loss to 1e-5 relative, gradient norm to 1e-4; updated parameters: every element within
0.1 of an AdamW step (lr) and the mean difference per tensor below 1e-3 of a step. Adam divides by
|g|, so where a gradient is tiny (the MTP head's mixing weights: ~1e-6, summed with cancellation) the
float32 noise of a different summation order (measured up to 4e-3 of that tensor's largest
gradient) shows up in its normalised step; routing biases exactly. The compiled step must show the collectives the
layout implies (parameter all-gathers over fsdp, gradient reductions)."""
import jax
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import parallelism
from mesh import hlo_collectives
from mesh.sharding import activate
from model.transformer import DeepSeekV4
from tests.model_configs import parity_args
from trainer.sharded_init import build_mesh
from trainer.state import TrainState, create_train_state, split_variables
from trainer.step import jit_train_step, make_train_step

LR = 1e-3
BATCH, SEQ = 16, 160
MESHES = [dict(fsdp=2, expert=2, tensor=2),
          pytest.param(dict(fsdp=8), marks=pytest.mark.slow),
          pytest.param(dict(data=2, expert=4), marks=pytest.mark.slow)]


def _args():
    return parity_args(num_layers=4, compress_ratios=(0, 0, 4, 128, 0))


def _train_config(**overrides):
    config = ml_collections.ConfigDict(dict(mtp_weight=0.3, balance_weight=1e-4, bias_update_rate=1e-3,
                                            microbatches=2))
    config.update(overrides)
    return config


def _batch(args, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, args.vocab_size, (BATCH, SEQ)).astype(np.int32)
    mask = (rng.random((BATCH, SEQ)) < 0.7).astype(np.int32)
    return {"tokens": tokens, "loss_mask": mask, "segment_ids": np.ones_like(tokens),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy()}


def _assert_params_close(ours, reference, lr=LR):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        diff = np.abs(np.asarray(a) - b)
        assert diff.max() < 0.1 * lr, diff.max()
        assert diff.mean() < 1e-3 * lr, diff.mean()


def _single_device_state(args, tx):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(DeepSeekV4(args, nnx.Rngs(0)))[1])()
    params, routing = split_variables(state)
    return graphdef, TrainState(step=np.zeros((), np.int32), params=params, opt_state=tx.init(params),
                                routing=routing, rng=jax.random.key_data(jax.random.key(0)),
                                nonfinite_steps=np.zeros((), np.int32))


def _single_device_step(args, tx, batch, lr=LR):
    """-> (initial state, state after one single-device step, its metrics), on the host."""
    graphdef, state = _single_device_state(args, tx)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(lr), _train_config()))
    new_state, metrics = step(state, batch)
    return jax.device_get((state, new_state, metrics))


@pytest.fixture(scope="module")
def single_device():
    args = _args()
    tx = optax.adamw(LR)
    graphdef, state = _single_device_state(args, tx)
    step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(LR), _train_config()))
    batch = _batch(args)
    new_state, metrics = step(state, batch)
    return args, step, state, batch, jax.device_get(new_state), jax.device_get(metrics)


def _mesh_id(axes):
    return ",".join(f"{k}={v}" for k, v in axes.items())


@pytest.mark.parametrize("axes", MESHES, ids=_mesh_id)
def test_sharded_step_matches_single_device(single_device, axes):
    args, _, _, batch, expected_state, expected = single_device
    _check_sharded_step(args, batch, expected_state, expected, axes, optax.adamw(LR), LR)


def _check_sharded_step(args, batch, expected_state, expected, axes, tx, lr, compare=_assert_params_close,
                        spreads_matrices=False):
    """-> the sharded step's initial state, after checking its step against the expected one.
    `spreads_matrices`: tx is Muon, whose Newton-Schulz moves matrices by all-to-all over the axes
    that shard them (mesh/batch_spread.py), besides the dispatch's over `expert`."""
    mesh_config = parallelism.get_config("cm384-8", **axes)
    mesh = build_mesh(mesh_config)
    with activate(mesh, mesh_config.rules):
        graphdef, state, shardings = create_train_state(args, mesh, mesh_config.rules, tx, seed=0)
        step, _ = jit_train_step(make_train_step(graphdef, tx, optax.constant_schedule(lr), _train_config()),
                                 shardings, mesh, mesh_config.rules)
        compiled = step.lower(state, batch).compile()
        new_state, metrics = compiled(state, batch)
    assert abs(float(metrics["loss"]) - expected["loss"]) < 1e-5 * abs(expected["loss"])
    assert abs(float(metrics["grad_norm"]) - expected["grad_norm"]) < 1e-4 * expected["grad_norm"]
    compare(new_state.params, expected_state.params, lr)
    for ours, reference in zip(jax.tree.leaves(new_state.routing), jax.tree.leaves(expected_state.routing)):
        np.testing.assert_array_equal(np.asarray(ours), reference)
    experts = new_state.params["groups"][0]["blocks"][0]["moe"]["experts"]["w1"][...]
    assert experts.sharding.spec == shardings.params["groups"][0]["blocks"][0]["moe"]["experts"]["w1"].get_value().spec
    _assert_collectives(compiled.as_text(), dict(mesh.shape), spreads_matrices)
    return state


def _assert_collectives(hlo: str, mesh_axes: dict, spreads_matrices: bool = False):
    """The collectives the layout implies, with the mesh axes their replica groups span: token
    exchanges by all-to-all over `expert` (partitioner reshuffles over the batch axes: 0.4% of those
    bytes in the tiny config's step on fsdp=2,expert=2,tensor=2, bound 5%); over `tensor`, the
    sequence-parallel gathers into the tensor regions (and all-to-alls between sequence and head
    shards, 3.8% of the expert bytes there); parameters gathered over `fsdp`; gradients of parameters replicated over the
    batch axes reduced over them."""
    parsed = [(c, axes) for c in hlo_collectives.parse(hlo) if (axes := c.axes(mesh_axes))]  # () = no-op
    found = [(c.kind, axes) for c, axes in parsed]
    if mesh_axes.get("expert", 1) > 1:
        # The dispatch's exchanges; the partitioner may add small reshuffles over other axes.
        moved = {}
        for c, axes in parsed:
            if c.kind == "all-to-all":
                moved[axes] = moved.get(axes, 0) + c.bytes
        other = sum(nbytes for axes, nbytes in moved.items() if axes not in (("expert",), ("tensor",)))
        if spreads_matrices:
            assert other > 0, moved
        else:
            assert other < 0.05 * moved.get(("expert",), 0), moved
    for axis in ("fsdp", "tensor"):
        if mesh_axes.get(axis, 1) > 1:
            assert any(kind == "all-gather" and axis in spans for kind, spans in found), (axis, found)
    batch_axes = {axis for axis in ("data", "fsdp", "expert") if mesh_axes.get(axis, 1) > 1}
    reduced = set().union(*(spans for kind, spans in found if kind in ("all-reduce", "reduce-scatter")))
    assert batch_axes <= reduced, (batch_axes, found)


def _muon(args, adam_eps=1e-8):
    """Muon for hidden matrices + AdamW for the rest, Newton-Schulz in float32 so the comparison sees
    summation order, not bf16 rounding; constant learning rate, no clipping."""
    from configs import optimizer
    from trainer.optimizer import build_optimizer
    from trainer.state import abstract_params

    config = optimizer.get_config("muon", learning_rate=LR, warmup_steps=0, decay="constant",
                                  muon_ns_dtype="float32", adam_eps=adam_eps, clip_grad_norm=0.0)
    return build_optimizer(config, abstract_params(args))


@pytest.mark.slow  # ~2 min; the default set covers the sharded step with AdamW and Muon on one device
def test_muon_sharded_step_matches_single_device(single_device):
    args, _, _, batch, _, _ = single_device
    tx = _muon(args)
    _, expected_state, expected = _single_device_step(args, tx, batch)
    _check_sharded_step(args, batch, expected_state, expected, dict(fsdp=2, expert=2, tensor=2), tx, LR,
                        spreads_matrices=True)


def _assert_state_split_over_data(state):
    """Some moments are split over `data` (which replicates every parameter on data x fsdp) and every
    optimizer-state leaf's sharding still holds its parameter's axes."""
    specs = [leaf.sharding.spec for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim]
    assert any("data" in jax.tree.leaves(tuple(spec)) for spec in specs), specs
    assert all("data" not in jax.tree.leaves(tuple(leaf.sharding.spec)) for leaf in jax.tree.leaves(state.params))


ZERO_MESH = dict(data=4, fsdp=2)


@pytest.mark.slow  # ~4 min; the default set has ZeRO-1 under SGD here and Muon's update in test_optimizer
def test_zero1_step_matches_single_device_muon(single_device):
    """ZeRO-1: on data=4 x fsdp=2 the optimizer state is split over data too; the Muon step (matrices
    gathered for Newton-Schulz from data-split momentum) equals the single-device one. AdamW's eps
    is 1e-5 here: at 1e-8 an embedding row's near-zero gradient turns summation order into a step
    difference of 0.13 lr (its update g / (|g| + eps))."""
    args, _, _, batch, _, _ = single_device
    tx = _muon(args, adam_eps=1e-5)
    _, expected_state, expected = _single_device_step(args, tx, batch)
    _assert_state_split_over_data(_check_sharded_step(args, batch, expected_state, expected, ZERO_MESH, tx, LR,
                                                      spreads_matrices=True))


def test_zero1_step_matches_single_device_with_a_linear_update(single_device):
    """ZeRO-1 under an update linear in the gradient (SGD with momentum, whose trace is the state split
    over data; lr 100 so the largest step, ~1e-2, is far above float32 rounding of the parameters): a
    gradient reduced to the wrong scale over data (summed, not averaged) moves the parameters by the
    wrong amount. Every tensor's step equals the single-device one to 1e-4 of its largest element."""
    args, _, _, batch, _, _ = single_device
    lr = 100.0
    tx = optax.sgd(lr, momentum=0.9)
    state, expected_state, expected = _single_device_step(args, tx, batch, lr)
    before = state.params

    def steps_equal(ours, reference, lr):
        del lr
        moved = 0
        for a, b, start in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), jax.tree.leaves(before)):
            step_ours = np.asarray(a) - start
            step_reference = b - start
            largest = np.abs(step_reference).max()  # 0 for the indexer, which no loss reaches
            np.testing.assert_allclose(step_ours, step_reference, rtol=0, atol=1e-4 * largest)
            moved += bool(largest > 0)
        assert moved > 0.8 * len(jax.tree.leaves(reference)), moved

    sharded = _check_sharded_step(args, batch, expected_state, expected, ZERO_MESH, tx, lr, steps_equal)
    _assert_state_split_over_data(sharded)


def test_microbatches_sum_to_the_whole_batch(single_device):
    """Two micro-batches accumulate the whole batch's gradient: same loss, gradient norm and, under SGD
    (whose update is the gradient), parameters. AdamW would blur the check: its first update
    g / (|g| + eps) turns the rounding of a gradient near eps into a difference of the order of lr."""
    args, _, _, batch, _, _ = single_device
    tx = optax.sgd(LR)
    runs = []
    for microbatches in (1, 2):
        graphdef, fresh = _single_device_state(args, tx)
        step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(LR), _train_config(microbatches=microbatches)))
        runs.append(jax.device_get(step(fresh, batch)))
    (whole, whole_metrics), (micro, micro_metrics) = runs
    for key in ("loss", "grad_norm"):
        assert abs(float(micro_metrics[key]) - float(whole_metrics[key])) < 1e-5 * abs(float(whole_metrics[key])), key
    for a, b in zip(jax.tree.leaves(micro.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * LR)  # gradients equal to 1e-5


def test_loss_falls_when_memorising_a_batch(single_device):
    _, step, state, batch, _, _ = single_device
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
    tx = build_optimizer(optimizer.get_config(name), abstract_params(args))
    state = abstract_train_state(args, build_mesh(config.mesh), config.mesh.rules, tx)
    ratio = shard_bytes(state.opt_state) / shard_bytes(state.params)
    assert {"adamw": 1.99, "muon": 1.0}[name] < ratio < {"adamw": 2.05, "muon": 1.3}[name], ratio
