"""The lightning indexer's own loss: KL(p || softmax(I)) over the entries each query selected, p the
main attention's probabilities of those entries summed over heads and L1-normalised (DeepSeek-V3.2's
sparse-training objective, which V4's CSA indexer follows).

Against a NumPy reference that computes the main attention densely (no query blocks or chunks) from
the layer's projections: the value, and the gradient in the indexer's head weights from the
analytic d KL / d I = softmax(I) - p. The loss reaches the indexer's parameters and nothing else;
with config.train.indexer_weight = 0 a step leaves every indexer parameter bitwise unchanged; with a
weight the main model's gradients do not change, and training the indexer alone lowers its loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from configs import optimizer as optimizer_config
from configs import parallelism
from mesh.sharding import activate
from model import rope
from model.args import CSA
from model.attention import Attention
from model.norms import rms_normalize
from model.transformer import DeepSeekV4
from objectives.sft import SFT
from tests.model_configs import tiny_args
from trainer.optimizer import INDEXER, build_optimizer
from trainer.sharded_init import build_mesh
from trainer.state import TrainState, abstract_params, create_train_state, split_variables
from trainer.step import INDEXER_LOSS, jit_train_step, make_train_step

SEQ = 64
DOCUMENTS = (40, 18)  # two documents, then padding up to SEQ
ROWS = 4
STEPS = 15


def _args(**overrides):
    """A sliding layer, then two CSA layers in one scan; window 16 in blocks of 4, top-4 of up to 16
    entries; no MTP layer and 2 Sinkhorn iterations (quicker compiles)."""
    fields = dict(
        num_layers=3,
        compress_ratios=(0, 4, 4),
        num_mtp_layers=0,
        num_hash_layers=1,
        hc_sinkhorn_iters=2,
        sliding_window=16,
        window_block=4,
        query_chunk=0,
        index_topk=4,
    )
    fields.update(overrides)
    return tiny_args(**fields)


def _packed(rows=ROWS):
    """positions, segment_ids [rows, SEQ] int32: the documents of DOCUMENTS, then padding (segment 0)."""
    padding = SEQ - sum(DOCUMENTS)
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(DOCUMENTS)] + [np.zeros(padding)])
    positions = np.concatenate([np.arange(n) for n in DOCUMENTS] + [np.zeros(padding)])
    return (np.repeat(positions[None], rows, 0).astype(np.int32), np.repeat(segments[None], rows, 0).astype(np.int32))


def _layer_problem(query_chunk):
    args = _args(query_chunk=query_chunk)
    layer = Attention(args, CSA, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(2, SEQ, args.hidden_size)), jnp.float32)
    positions, segments = (jnp.asarray(a) for a in _packed(rows=2))
    return args, layer, u, positions, segments


def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _reference(args, layer, u, positions, segments):
    """(summed KL, d KL / d weights_proj) in NumPy float64. From the layer's modules: the projections
    (queries, window keys, compressed entries) and the indexer's selection, queries and keys; in NumPy:
    the dense attention softmax, p, the index scores, the KL and its gradient."""
    inv_freq = rope.inverse_frequencies(args, compressed=True)
    q_latent = layer.q_norm(jnp.einsum("bsd,dr->bsr", u, layer.wq_a[...]))
    q = rope.rotate(
        rms_normalize(jnp.einsum("bsr,rhc->bshc", q_latent, layer.wq_b[...]), args.rms_norm_eps),
        positions[..., None],
        inv_freq,
    )
    kv = rope.rotate(layer.kv_norm(jnp.einsum("bsd,dc->bsc", u, layer.wkv[...])), positions, inv_freq)
    compressed = layer.compressor(u, positions, segments)
    visible = compressed.usable(positions, segments, layer.ratio)
    selected = np.asarray(layer.indexer(u, q_latent, positions, segments, visible)[0])
    index_q = rope.rotate(
        jnp.einsum("bsr,rhc->bshc", q_latent, layer.indexer.wq_b[...]), positions[..., None], inv_freq
    )
    index_keys = layer.indexer.compressor(u, positions, segments).values
    q, kv, entries, index_q, index_keys, u64 = (
        np.asarray(a, np.float64) for a in (q, kv, compressed.values, index_q, index_keys, u)
    )
    segments, sink = np.asarray(segments), np.asarray(layer.attn_sink[...], np.float64)
    weights_proj = np.asarray(layer.indexer.weights_proj[...], np.float64)
    heads, index_heads, dim = args.num_heads, args.index_n_heads, args.index_head_dim

    rows = np.arange(SEQ)
    distance = rows[:, None] - rows[None, :]
    total_kl, grad = 0.0, np.zeros_like(weights_proj)
    for b in range(u.shape[0]):
        # Main attention, dense: window keys of the same document, then the selected entries, then the sink.
        window = (distance >= 0) & (distance < args.sliding_window) & (segments[b][:, None] == segments[b][None, :])
        logits_window = np.einsum("shc,kc->hsk", q[b], kv[b]) * args.head_dim**-0.5
        logits_entries = np.einsum("shc,nc->hsn", q[b], entries[b]) * args.head_dim**-0.5
        logits = np.concatenate(
            [
                np.where(window, logits_window, -np.inf),
                np.where(selected[b], logits_entries, -np.inf),
                np.broadcast_to(sink[:, None, None], (heads, SEQ, 1)),
            ],
            axis=-1,
        )
        attended = _softmax(logits)[..., SEQ:-1].sum(axis=0)  # [s, n]
        # The indexer's scores.
        head_scores = np.maximum(np.einsum("shc,nc->shn", index_q[b], index_keys[b]), 0.0) * dim**-0.5
        head_weights = u64[b] @ weights_proj * index_heads**-0.5  # [s, h]
        index = np.einsum("sh,shn->sn", head_weights, head_scores)
        for t in range(SEQ):
            chosen = selected[b, t]
            if not chosen.any():
                continue
            p = attended[t, chosen] / attended[t, chosen].sum()
            q_index = _softmax(index[t, chosen])
            total_kl += np.sum(p * np.log(p / q_index))
            d_index = np.zeros(chosen.shape)
            d_index[chosen] = q_index - p
            grad += np.outer(u64[b, t], head_scores[t] @ d_index) * index_heads**-0.5
    return total_kl, grad


@pytest.mark.parametrize("query_chunk", [0, 8], ids=["all_queries", "chunks_of_8"])
def test_the_indexer_loss_and_its_gradient_equal_a_numpy_reference(query_chunk):
    args, layer, u, positions, segments = _layer_problem(query_chunk)
    graphdef, state = nnx.split(layer)
    kl = lambda st: nnx.merge(graphdef, st)(u, positions, segments, indexer_loss=True)[1]
    value, grads = jax.jit(jax.value_and_grad(kl))(state)
    expected, expected_grad = _reference(args, layer, u, positions, segments)
    assert expected > 1.0  # not a trivial case: several queries select among more than top-k entries
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    grad = np.asarray(grads["indexer"]["weights_proj"][...])
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-5 * np.abs(expected_grad).max())
    # The loss reaches the indexer (its projections and its own compressor) and nothing else.
    for path, leaf in nnx.to_flat_state(grads):
        moved = np.abs(np.asarray(leaf[...])).max() > 0
        if path[0] != INDEXER:
            assert not moved, path
        elif path[-1] in ("wq_b", "weights_proj", "wkv", "wgate"):
            assert moved, path
    # Not asked for: zero, and the same attention output.
    out, none = nnx.merge(graphdef, state)(u, positions, segments)
    np.testing.assert_array_equal(out, nnx.merge(graphdef, state)(u, positions, segments, indexer_loss=True)[0])
    assert float(none) == 0.0


def _sft(bias_update_rate=1e-3):
    return SFT(mtp_weight=optax.constant_schedule(0.3), bias_update_rate=bias_update_rate)


def _train_config(indexer_weight, **overrides):
    config = ml_collections.ConfigDict(dict(balance_weight=1e-4, microbatches=2, indexer_weight=indexer_weight))
    config.update(overrides)
    return config


def _batch(args, rows=ROWS):
    rng = np.random.default_rng(0)
    positions, segments = _packed(rows)
    tokens = np.where(segments > 0, rng.integers(0, args.vocab_size, segments.shape), 0).astype(np.int32)
    return {
        "tokens": tokens,
        "loss_mask": (segments > 0).astype(np.int32),
        "segment_ids": segments,
        "positions": positions,
    }


def _state(args, tx):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
    params, routing = split_variables(jax.jit(lambda: nnx.split(DeepSeekV4(args, nnx.Rngs(0)))[1])())
    return graphdef, TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        routing=routing,
        rng=jax.random.key_data(jax.random.key(0)),
        nonfinite_steps=jnp.zeros((), jnp.int32),
    )


def _is_indexer(path) -> bool:
    return INDEXER in [str(getattr(key, "key", key)) for key in path]


def _flat(params) -> dict:
    return {path: np.asarray(leaf[...]) for path, leaf in nnx.to_flat_state(params)}


def test_without_a_weight_a_step_leaves_the_indexer_bitwise_unchanged():
    """Muon + AdamW with decay, as the run configs build it: the indexer gets no update and no state."""
    args = _args()
    tx = build_optimizer(optimizer_config.get_config("muon", learning_rate=1e-2, warmup_steps=0), abstract_params(args))
    graphdef, state = _state(args, tx)
    before = _flat(state.params)
    step = jax.jit(
        make_train_step(graphdef, tx, optax.constant_schedule(1e-2), _train_config(0.0, microbatches=1), _sft())
    )
    new_state, metrics = step(state, _batch(args))
    assert INDEXER_LOSS not in metrics
    after = _flat(new_state.params)
    indexer = [path for path in before if _is_indexer(path)]
    assert len(indexer) == 6  # wq_b, weights_proj, compressor wkv, wgate, ape, norm (both CSA layers, stacked)
    for path in indexer:
        np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))
    others = [path for path in before if not _is_indexer(path)]
    moved = [path for path in others if not np.array_equal(after[path], before[path])]
    assert len(moved) > 0.9 * len(others)
    # The optimizer holds no state for the indexer.
    keys = jax.tree_util.tree_map_with_path(lambda path, _: jax.tree_util.keystr(path), state.params)
    owners = optax.tree_map_params(
        tx,
        lambda leaf, key: None if isinstance(leaf, optax.MaskedNode) else key,
        state.opt_state,
        keys,
        transform_non_params=lambda _: None,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    owned = {key for key in jax.tree.leaves(owners) if isinstance(key, str)}
    assert owned and not any(INDEXER in key for key in owned)


def _indexer_alone(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on the indexer's parameters; every other parameter frozen."""
    label = lambda tree: jax.tree_util.tree_map_with_path(lambda path, _: "on" if _is_indexer(path) else "off", tree)
    return optax.partition({"on": tx, "off": optax.set_to_zero()}, label)


def test_with_a_weight_the_main_model_gradients_do_not_change():
    """SGD with rate 1 (update = -gradient), micro-batches and remat: weight 1 adds the indexer loss to
    the total and moves the indexer; every other parameter moves exactly (bitwise) as with weight 0."""
    args = _args(remat_policy="full")
    tx = optax.sgd(1.0)
    graphdef, state = _state(args, tx)
    batch = _batch(args)
    results = {}
    for weight in (0.0, 1.0):
        step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(1.0), _train_config(weight), _sft()))
        new_state, metrics = step(state, batch)
        results[weight] = _flat(new_state.params), jax.device_get(metrics)
    before = _flat(state.params)
    (without, metrics_without), (with_, metrics_with) = results[0.0], results[1.0]
    indexer_loss = metrics_with[INDEXER_LOSS]
    assert indexer_loss > 0.01
    np.testing.assert_allclose(metrics_with["loss"], metrics_without["loss"] + indexer_loss, rtol=1e-6)
    for path in before:
        if _is_indexer(path):
            np.testing.assert_array_equal(without[path], before[path], err_msg=str(path))
            assert not np.array_equal(with_[path], before[path]), path
        else:
            np.testing.assert_array_equal(with_[path], without[path], err_msg=str(path))


def test_training_the_indexer_alone_lowers_its_loss():
    args = _args()
    tx = _indexer_alone(optax.adam(3e-2))
    graphdef, state = _state(args, tx)
    before = _flat(state.params)
    batch = _batch(args)
    step = jax.jit(
        make_train_step(graphdef, tx, optax.constant_schedule(3e-2), _train_config(1.0), _sft(bias_update_rate=0.0))
    )
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics[INDEXER_LOSS]))
    print("indexer loss per step:", np.round(losses, 4))
    assert losses[-1] < 0.5 * losses[0], losses
    after = _flat(state.params)
    for path in before:
        if not _is_indexer(path):
            np.testing.assert_array_equal(after[path], before[path], err_msg=str(path))


@pytest.mark.slow
def test_the_sharded_step_trains_the_indexer_as_one_device():
    """data=2 x fsdp=2 x expert=2 (ZeRO-1 over data, Muon spread over the mesh), weight 1: the same
    indexer loss, and the same indexer update per tensor, as the single-device step (Newton-Schulz in
    float32: in bf16 the summation order's rounding grows to ~2% of an update)."""
    args = _args()
    settings = optimizer_config.get_config("muon", learning_rate=1e-2, warmup_steps=0, muon_ns_dtype="float32")
    tx = build_optimizer(settings, abstract_params(args), train_indexer=True)
    batch = _batch(args, rows=16)  # 8 rows per micro-batch, one per device
    train_config = _train_config(1.0)
    graphdef, state = _state(args, tx)
    reference, reference_metrics = jax.device_get(
        jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(1e-2), train_config, _sft()))(state, batch)
    )
    mesh_config = parallelism.get_config("cm384-8", data=2, fsdp=2, expert=2)
    mesh, rules = build_mesh(mesh_config), mesh_config.rules
    with activate(mesh, rules):
        graphdef, sharded, shardings = create_train_state(args, mesh, rules, tx, seed=0)
        step, _ = jit_train_step(
            make_train_step(graphdef, tx, optax.constant_schedule(1e-2), train_config, _sft()), shardings, mesh, rules
        )
        new_state, metrics = jax.device_get(step(sharded, batch))
    np.testing.assert_allclose(metrics[INDEXER_LOSS], reference_metrics[INDEXER_LOSS], rtol=1e-5)
    before, ours, theirs = _flat(state.params), _flat(new_state.params), _flat(reference.params)
    for path in before:
        if _is_indexer(path):
            expected = theirs[path] - before[path]
            np.testing.assert_allclose(
                ours[path] - before[path], expected, rtol=0, atol=1e-3 * np.abs(expected).max(), err_msg=str(path)
            )
