"""trainer/optimizer.py against NumPy references, on the tiny model's real parameter tree, and sharded.

Updates are compared in float32 (Newton-Schulz matmuls too, `muon_ns_dtype="float32"`) with the
float64 references, so TOL is float32 rounding through ten NS iterations.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import configs.optimizer
import configs.tiny
from model import args as model_args
from model.transformer import DeepSeekV4
from trainer import optimizer

TOL = dict(rtol=1e-4, atol=1e-6)
LR = 0.01
EXPERT_NAMES = ("layers", "expert", "expert_embed", "expert_mlp")


def param(value, names):
    return nnx.Param(jnp.asarray(value), out_sharding=names, eager_sharding=False)


def like(params, values):
    """A tree with the structure and metadata of flat `params` holding float32 `values[key]`."""
    return nnx.State({k: v.replace(jnp.asarray(values[k], jnp.float32)) for k, v in params.items()})


def config(name, **overrides):
    """A constant learning rate LR from step 0, float32 Newton-Schulz."""
    fields = dict(learning_rate=LR, warmup_steps=0, decay="constant", muon_ns_dtype="float32")
    return configs.optimizer.get_config(name, **dict(fields, **overrides))


def numpy_newton_schulz(x, stages):
    """One matrix, float64: Frobenius normalisation then the quintic iteration, short-side Gram."""
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / (np.linalg.norm(x) + configs.optimizer.get_config().muon_ns_eps)
    for iterations, a, b, c in stages:
        for _ in range(iterations):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def numpy_muon(w, grads, cfg):
    """Muon as the spec writes it, every [in, out] matrix of w [L, E, in, out] on its own."""
    momentum = np.zeros_like(w)
    for g in grads:
        momentum = cfg.muon_momentum * momentum + g
        direction = cfg.muon_momentum * momentum + g
        update = np.stack([[numpy_newton_schulz(m, cfg.muon_ns_stages) for m in layer] for layer in direction])
        update *= math.sqrt(max(w.shape[-2:])) * cfg.muon_rms_scale
        w = w * (1 - LR * cfg.muon_weight_decay) - LR * update
    return w


def numpy_adamw(w, grads, cfg, decay):
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, 1):
        m = cfg.adam_b1 * m + (1 - cfg.adam_b1) * g
        v = cfg.adam_b2 * v + (1 - cfg.adam_b2) * g * g
        step = (m / (1 - cfg.adam_b1**t)) / (np.sqrt(v / (1 - cfg.adam_b2**t)) + cfg.adam_eps)
        w = w - LR * (step + (cfg.adam_weight_decay * w if decay else 0))
    return w


def run_steps(tx, params, grads_list):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_list:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_muon_two_steps_match_numpy_per_matrix():
    """Momentum with Nesterov, hybrid NS of each (layer, expert) matrix on its own (tall and wide
    ones), the sqrt(max(n, m)) * 0.18 rescale and decoupled decay; and AdamW on a vector beside it."""
    rng = np.random.default_rng(0)
    cfg = config("muon", clip_grad_norm=0.0)
    shapes = {"wide": (2, 3, 6, 10), "tall": (2, 3, 12, 5)}
    w = {k: rng.normal(size=s) for k, s in shapes.items()}
    gain = rng.normal(size=(2, 8))
    params = nnx.State(
        {k: param(v.astype(np.float32), EXPERT_NAMES) for k, v in w.items()}
        | {"norm": param(gain.astype(np.float32), ("layers", "embed"))}
    )
    grads = [
        {k: rng.normal(size=s) for k, s in shapes.items()} | {"norm": rng.normal(size=gain.shape)} for _ in range(2)
    ]
    new, _ = run_steps(optimizer.build_optimizer(cfg, params), params, [like(params, g) for g in grads])
    for k in shapes:
        np.testing.assert_allclose(new[k][...], numpy_muon(w[k], [g[k] for g in grads], cfg), **TOL)
    np.testing.assert_allclose(new["norm"][...], numpy_adamw(gain, [g["norm"] for g in grads], cfg, False), **TOL)


def test_adamw_matches_numpy_with_decay_mask():
    """name "adamw": every parameter AdamW, matrices (here experts and embedding) decayed, vectors not."""
    rng = np.random.default_rng(1)
    cfg = config("adamw", clip_grad_norm=0.0)
    values = {
        "experts": (rng.normal(size=(2, 3, 4, 5)), EXPERT_NAMES),
        "embed": (rng.normal(size=(16, 4)), ("vocab", "embed")),
        "norm": (rng.normal(size=(4,)), ("embed",)),
    }
    params = nnx.State({k: param(v.astype(np.float32), names) for k, (v, names) in values.items()})
    grads = [{k: rng.normal(size=v.shape) for k, (v, _) in values.items()} for _ in range(3)]
    new, _ = run_steps(optimizer.build_optimizer(cfg, params), params, [like(params, g) for g in grads])
    for k, (v, _) in values.items():
        expected = numpy_adamw(v, [g[k] for g in grads], cfg, decay=k != "norm")
        np.testing.assert_allclose(new[k][...], expected, **TOL)


def test_hybrid_newton_schulz_orthogonalises():
    """The 8 + 2 hybrid schedule ends with singular values at 1 (the first 8 steps alone leave them
    spread over roughly 0.7-1.2); BF16 matmuls (the default) stay close to float32."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 40)), jnp.float32)
    stages = configs.optimizer.get_config().muon_ns_stages
    eps = configs.optimizer.get_config().muon_ns_eps
    f32 = optimizer.newton_schulz(x, stages, eps, jnp.float32)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(f32), compute_uv=False), 1.0, atol=1e-2)
    first_only = optimizer.newton_schulz(x, stages[:1], eps, jnp.float32)
    assert np.ptp(np.linalg.svd(np.asarray(first_only), compute_uv=False)) > 0.2
    bf16 = optimizer.newton_schulz(x, stages, eps, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=3e-2)


def test_partition_of_the_tiny_model():
    """Roles on the real parameter tree, decided from logical axis names (abstract model, no init); the
    indexer's parameters are frozen unless its loss trains them."""
    args = model_args.from_config(configs.tiny.get_config().model)
    _, params, _ = nnx.split(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))), nnx.Param, ...)
    roles = optimizer.param_roles(params, train_indexer=True)
    assert len(roles) == len(jax.tree.leaves(params))
    frozen = {p for p, r in optimizer.param_roles(params).items() if r.optimizer == optimizer.FROZEN}
    assert frozen == {p for p in roles if "/indexer/" in p} and len(frozen) == 6 * 2  # 2 stacked CSA groups
    assert not any(r.decay for p, r in optimizer.param_roles(params).items() if p in frozen)
    leaf = lambda path: path.split("/")[-1]
    adamw = {p for p, r in roles.items() if r.optimizer == optimizer.ADAMW}
    vectors = {p for p in roles if p.endswith("norm/weight") or leaf(p) in ("base", "scale", "attn_sink")}
    apes = {p for p in roles if leaf(p) == "ape"}
    assert adamw == {"embed", "head"} | vectors | apes
    assert {leaf(p) for p in roles if p not in adamw} == {
        "w1",
        "w2",
        "w3",
        "weight",
        "wq_a",
        "wq_b",
        "wkv",
        "wo_a",
        "wo_b",
        "fn",
        "wgate",
        "weights_proj",
        "e_proj",
        "h_proj",
    }
    assert {p for p, r in roles.items() if not r.decay} == vectors | apes

    block = "groups/0/blocks/0/"
    shapes = {"/".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(params)}
    shape = lambda p: roles[p].matrix_shape(shapes[p])
    e, d, i = args.num_routed_experts, args.hidden_size, args.moe_intermediate_size
    h, c = args.num_heads, args.head_dim
    assert roles[block + "moe/experts/w1"].batch == (0, 1) and shape(block + "moe/experts/w1") == (d, i)
    assert shape(block + "moe/experts/w2") == (i, d)
    assert shape(block + "moe/router/weight") == (d, e)
    assert shape(block + "attn/wq_b") == (args.q_lora_rank, h * c)
    assert roles[block + "attn/wo_a"].groups == args.o_groups
    assert shape(block + "attn/wo_a") == (h // args.o_groups * c, args.o_lora_rank)
    assert roles[block + "attn/wo_b"].batch == (0,)
    assert shape(block + "attn/wo_b") == (args.o_groups * args.o_lora_rank, d)
    assert shape(block + "attn_hc/fn") == (args.hc_mult * d, (2 + args.hc_mult) * args.hc_mult)
    assert shape("mtp/0/block/moe/experts/w1") == (d, i) and roles["mtp/0/block/moe/experts/w1"].batch == (0,)


def test_grouped_heads_are_separate_matrices():
    """wo_a [heads, head_dim, o_lora] with 2 output groups: each group of heads is one matrix."""
    rng = np.random.default_rng(3)
    cfg = config("muon", clip_grad_norm=0.0)
    heads, dim, rank, groups = 4, 3, 5, 2
    params = nnx.State(
        {
            "wo_a": param(jnp.zeros((heads, dim, rank)), ("heads", "head_dim", "o_lora")),
            "wo_b": param(jnp.zeros((groups, rank, 7)), ("o_groups", "o_lora", "embed")),
        }
    )
    g = rng.normal(size=(heads, dim, rank))
    grads = like(params, {"wo_a": g, "wo_b": np.zeros(params["wo_b"].shape)})
    new, _ = run_steps(optimizer.build_optimizer(cfg, params), params, [grads])
    per_group = g.reshape(groups, heads // groups * dim, rank) * (1 + cfg.muon_momentum)
    expected = np.stack([numpy_newton_schulz(m, cfg.muon_ns_stages) for m in per_group])
    expected *= -LR * math.sqrt(heads // groups * dim) * cfg.muon_rms_scale
    np.testing.assert_allclose(new["wo_a"][...], expected.reshape(heads, dim, rank), **TOL)


def test_output_groups_of_wo_b_are_one_matrix():
    """wo_b [o_groups, o_lora, d]: the layer sums the groups' outputs, i.e. applies one
    [groups x o_lora, d] matrix (the reference's single linear), so Muon orthogonalises that matrix
    whole, not each group's block."""
    rng = np.random.default_rng(5)
    cfg = config("muon", clip_grad_norm=0.0)
    groups, rank, d = 2, 5, 7
    params = nnx.State({"wo_b": param(jnp.zeros((groups, rank, d)), ("o_groups", "o_lora", "embed"))})
    g = rng.normal(size=(groups, rank, d))
    new, _ = run_steps(optimizer.build_optimizer(cfg, params), params, [like(params, {"wo_b": g})])
    whole = numpy_newton_schulz(g.reshape(groups * rank, d) * (1 + cfg.muon_momentum), cfg.muon_ns_stages)
    expected = -LR * math.sqrt(max(groups * rank, d)) * cfg.muon_rms_scale * whole
    np.testing.assert_allclose(new["wo_b"][...], expected.reshape(groups, rank, d), **TOL)


@pytest.mark.parametrize("name", configs.optimizer.NAMES)
def test_weight_decay_mask(name):
    """With zero gradients only the decay moves a parameter: W <- W (1 - lr wd) for matrices
    (experts, attention, embedding, head), untouched for norm gains, mHC base/scale, sinks and ape."""
    names = {
        "experts": EXPERT_NAMES,
        "embed": ("vocab", "embed"),
        "head": ("embed", "vocab"),
        "wq_a": ("layers", "embed", "q_lora"),
        "norm": ("layers", "embed"),
        "base": ("layers", "hc_mix"),
        "scale": ("layers", "hc_gate"),
        "attn_sink": ("layers", "heads"),
        "ape": ("layers", "comp_pos", "kv_comp"),
    }
    sizes = {"layers": 2, "expert": 3, "vocab": 16, "hc_mix": 24, "hc_gate": 3, "heads": 4, "comp_pos": 4}
    params = nnx.State({k: param(jnp.ones([sizes.get(n, 8) for n in v]), v) for k, v in names.items()})
    cfg = config(name)
    new, _ = run_steps(optimizer.build_optimizer(cfg, params), params, [jax.tree.map(jnp.zeros_like, params)])
    decay = cfg.muon_weight_decay if name == "muon" else cfg.adam_weight_decay
    for k in names:
        decayed = k in ("experts", "embed", "head", "wq_a")
        np.testing.assert_allclose(new[k][...], 1 - LR * decay if decayed else 1.0, rtol=1e-6, err_msg=k)


def test_learning_rate_schedule():
    """Warmup from 0, plateau, then cosine or linear decay to final_lr_ratio * peak, held after."""
    peak, final = 1.0, 0.1
    base = dict(learning_rate=peak, warmup_steps=10, total_steps=110, decay_steps=40, final_lr_ratio=final)
    cosine = optimizer.learning_rate_schedule(configs.optimizer.get_config(decay="cosine", **base))
    linear = optimizer.learning_rate_schedule(configs.optimizer.get_config(decay="linear", **base))
    constant = optimizer.learning_rate_schedule(configs.optimizer.get_config(decay="constant", **base))
    expected = {
        0: (0.0, 0.0),
        5: (0.5, 0.5),
        10: (peak, peak),
        70: (peak, peak),
        90: ((peak + final) / 2, (peak + final) / 2),
        110: (final, final),
        500: (final, final),
    }
    for step, (c, l) in expected.items():
        np.testing.assert_allclose([cosine(step), linear(step)], [c, l], rtol=1e-6, atol=1e-7, err_msg=str(step))
    np.testing.assert_allclose(
        cosine(70 + 40 // 4), final + (peak - final) * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(linear(70 + 40 // 5), peak - (peak - final) / 5, rtol=1e-6)
    np.testing.assert_allclose([constant(5), constant(500)], [0.5, peak], rtol=1e-6)
    whole = optimizer.learning_rate_schedule(
        configs.optimizer.get_config(decay="cosine", **dict(base, decay_steps=None))
    )
    np.testing.assert_allclose([whole(10), whole(60), whole(110)], [peak, (peak + final) / 2, final], rtol=1e-6)
    with pytest.raises(ValueError):
        optimizer.learning_rate_schedule(configs.optimizer.get_config(**dict(base, decay_steps=101)))


def test_clip_by_global_norm():
    """The norm is taken over all parameters together: two leaves each under the limit, jointly over
    it, are both scaled by limit/norm (seen in AdamW's first moment, (1 - b1) * clipped gradient)."""
    cfg = config("adamw", clip_grad_norm=1.0)
    params = nnx.State({"a": param(jnp.zeros((3, 4)), ("embed", "mlp")), "b": param(jnp.zeros(5), ("embed",))})
    for scale in (0.2, 3.0):
        grads = jax.tree.map(lambda p: jnp.full(p.shape, scale / math.sqrt(17)), params)
        _, state = run_steps(optimizer.build_optimizer(cfg, params), params, [grads])
        factor = min(1.0, cfg.clip_grad_norm / scale)
        for k in ("a", "b"):
            first_moment = optax.tree.get(state, "mu")[k][...]
            np.testing.assert_allclose(first_moment, (1 - cfg.adam_b1) * grads[k][...] * factor, rtol=1e-6)


@pytest.mark.parametrize("name", configs.optimizer.NAMES)
def test_accumulation_equals_one_big_batch(name):
    """k calls on k equal micro-batches (mean losses) make the update of one call on the whole batch,
    including the clipping of the mean gradient, and leave the params unchanged in between."""
    k, rows = 4, 16
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(rows, 6)).astype(np.float32), rng.normal(size=(rows, 5)).astype(np.float32)
    params = nnx.State(
        {
            "w": param(rng.normal(size=(6, 5)).astype(np.float32), ("embed", "mlp")),
            "b": param(np.zeros(5, np.float32), ("mlp",)),
        }
    )
    loss = lambda p, x, y: jnp.mean((x @ p["w"][...] + p["b"][...] - y) ** 2)
    grad = jax.jit(jax.grad(loss))
    clip = 0.5
    assert optax.tree.norm(grad(params, x, y)) > clip
    whole, accumulating = (
        optimizer.build_optimizer(config(name, clip_grad_norm=clip, accumulation_steps=n), params) for n in (1, k)
    )
    big, big_state = params, whole.init(params)
    state, update, accumulated = accumulating.init(params), jax.jit(accumulating.update), params
    for _ in range(2):
        updates, big_state = jax.jit(whole.update)(grad(big, x, y), big_state, big)
        big = optax.apply_updates(big, updates)
        for micro in range(k):
            updates, state = update(grad(accumulated, x[micro::k], y[micro::k]), state, accumulated)
            if micro < k - 1:
                assert all(not np.any(u) for u in jax.tree.leaves(updates))
            accumulated = optax.apply_updates(accumulated, updates)
    for key in ("w", "b"):
        np.testing.assert_allclose(accumulated[key][...], big[key][...], rtol=1e-5, atol=1e-7)


def test_bf16_params_keep_float32_state():
    """bf16 parameters: moments, momentum and updates are float32 from init on (the state's dtypes
    never change between steps), and apply_updates rounds the result back to bf16."""
    params = nnx.State(
        {
            "w": param(jnp.ones((2, 3, 4, 5), jnp.bfloat16), EXPERT_NAMES),
            "norm": param(jnp.ones(4, jnp.bfloat16), ("embed",)),
        }
    )
    tx = optimizer.build_optimizer(config("muon"), params)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, new_state = tx.update(grads, state, params)
    floats = lambda tree: {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert floats(state) == floats(new_state) == floats(updates) == {"float32"}
    assert floats(optax.apply_updates(params, updates)) == {"bfloat16"}


@pytest.mark.parametrize("name", configs.optimizer.NAMES)
def test_bf16_params_follow_float32_masters(name):
    """bf16 parameters with master_weights: the state's masters take the steps of a float32 run from
    the same values and gradients, and the parameters are those masters rounded to bf16. The steps
    (lr 1e-3) are below bf16's spacing near 1 (2^-7), so rounding every step instead
    (master_weights=False) ends elsewhere."""
    rng = np.random.default_rng(9)
    half = nnx.State(
        {
            "w": param(jnp.asarray(1 + rng.normal(size=(2, 3, 16, 12)) / 8, jnp.bfloat16), EXPERT_NAMES),
            "norm": param(jnp.asarray(1 + rng.normal(size=(2, 16)) / 8, jnp.bfloat16), ("layers", "embed")),
        }
    )
    full = jax.tree.map(lambda x: x.astype(jnp.float32), half)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), full) for _ in range(3)]
    settings = dict(learning_rate=1e-3, adam_eps=1e-8)
    expected, _ = run_steps(optimizer.build_optimizer(config(name, **settings), full), full, grads)
    params, state = run_steps(optimizer.build_optimizer(config(name, **settings), half), half, grads)
    rounding = config(name, master_weights=False, **settings)
    rounded, _ = run_steps(optimizer.build_optimizer(rounding, half), half, grads)
    for key in ("w", "norm"):
        master = state.master[key][...]
        assert master.dtype == jnp.float32 and params[key][...].dtype == jnp.bfloat16
        np.testing.assert_allclose(master, expected[key][...], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(params[key][...], master.astype(jnp.bfloat16))
        assert np.max(np.abs(rounded[key][...].astype(np.float32) - expected[key][...])) > 1e-3, key


@pytest.mark.parametrize("name", configs.optimizer.NAMES)
def test_sharded_update_equals_unsharded(name):
    """Experts sharded over `expert`, their input axis over `fsdp` (the contraction NS runs over),
    on an Auto mesh: the jitted step gives the single-device result and keeps every sharding."""
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()).reshape(2, 4), ("fsdp", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    rng = np.random.default_rng(5)
    params = nnx.State(
        {
            "w": param(rng.normal(size=(2, 8, 16, 12)).astype(np.float32), EXPERT_NAMES),
            "norm": param(rng.normal(size=(2, 16)).astype(np.float32), ("layers", "embed")),
        }
    )
    specs = {"w": P(None, "expert", "fsdp", None), "norm": P(None, "fsdp")}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]
    tx = optimizer.build_optimizer(config(name), params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def run(place):
        p = place(params)
        state = jax.jit(tx.init)(p)
        for g in grads:
            p, state = jax.jit(step)(p, state, place(g))
        return p, state

    expected, _ = run(lambda tree: tree)
    shard = lambda tree: nnx.State(
        {k: v.replace(jax.device_put(v[...], NamedSharding(mesh, specs[k]))) for k, v in tree.items()}
    )
    sharded, state = run(shard)
    for key in ("w", "norm"):
        np.testing.assert_allclose(np.asarray(sharded[key][...]), expected[key][...], rtol=2e-5, atol=1e-6)
        wanted = NamedSharding(mesh, specs[key])
        assert sharded[key][...].sharding.is_equivalent_to(wanted, sharded[key][...].ndim), key
        moments = [x for x in jax.tree.leaves(state) if x.shape == sharded[key][...].shape]
        assert moments and all(m.sharding.is_equivalent_to(wanted, m.ndim) for m in moments), key


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_logged_learning_rate_is_the_applied_one(name):
    """The rate the step logs follows the optimizer's own count: it advances with applied updates
    only, so a refused step (state kept, step counter advanced) or an accumulating call does not
    move it, where schedule(calls) would."""
    params = nnx.State({"w": param(np.ones((6, 5), np.float32), ("embed", "mlp"))})
    grads = like(params, {"w": np.full((6, 5), 0.1, np.float32)})
    settings = config(name, warmup_steps=10, total_steps=20, accumulation_steps=2)
    tx, schedule = optimizer.build_optimizer(settings, params), optimizer.learning_rate_schedule(settings)
    state = tx.init(params)
    rates = []
    for _ in range(4):
        rates.append(float(optimizer.at_applied_updates(state, schedule, step=len(rates))))
        _, state = tx.update(grads, state, params)
    assert rates == [float(schedule(0))] * 2 + [float(schedule(1))] * 2
    assert rates[1] != float(schedule(1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", configs.optimizer.NAMES)
def test_state_split_over_data_gives_the_unsharded_update(name, dtype):
    """ZeRO-1 on a data=2 x fsdp=4 mesh: parameters sharded over fsdp only, their optimizer state
    (trainer.state.optimizer_shardings with an `optimizer_state -> data` rule) over data too, the
    float32 masters of bf16 parameters included; two jitted steps keep those shardings and give the
    single-device parameters (to bf16's rounding for bf16)."""
    from trainer.state import optimizer_shardings

    mesh = jax.sharding.Mesh(
        np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    rng = np.random.default_rng(6)
    params = nnx.State(
        {
            "w": param(rng.normal(size=(2, 8, 16, 12)).astype(dtype), EXPERT_NAMES),
            "norm": param(rng.normal(size=(2, 16)).astype(dtype), ("layers", "embed")),
        }
    )
    specs = {"w": P(None, None, "fsdp", None), "norm": P(None, "fsdp")}
    param_shardings = nnx.State({k: v.replace(NamedSharding(mesh, specs[k])) for k, v in params.items()})
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]
    tx = optimizer.build_optimizer(config(name), params)
    state_shardings = optimizer_shardings(tx, params, param_shardings, mesh, (("optimizer_state", "data"),))

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    expected, state = params, tx.init(params)
    for g in grads:
        expected, state = jax.jit(step)(expected, state, g)
    sharded = jax.device_put(params, param_shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(sharded)
    sharded_step = jax.jit(step, out_shardings=(param_shardings, state_shardings))
    for g in grads:
        sharded, state = sharded_step(sharded, state, jax.device_put(g, param_shardings))
    split = [leaf.sharding.spec for leaf in jax.tree.leaves(state) if leaf.ndim]
    assert split and all("data" in jax.tree.leaves(tuple(spec)) for spec in split), split
    tolerance = dict(rtol=2e-5, atol=1e-6) if dtype == "float32" else dict(rtol=2**-7, atol=0)
    for key in ("w", "norm"):
        np.testing.assert_allclose(
            np.asarray(sharded[key][...], np.float32), np.asarray(expected[key][...], np.float32), **tolerance
        )
        assert sharded[key][...].sharding.spec == specs[key], key


@pytest.mark.parametrize("name", configs.optimizer.NAMES)
def test_bfloat16_momentum_is_stored_in_bfloat16(name):
    """momentum_dtype="bfloat16": AdamW's first moments and Muon's momentum are stored in bf16 (the
    second moments and the updates stay float32), and three steps stay within bf16 rounding (2e-2 of
    a step) of the float32 state's parameters."""
    rng = np.random.default_rng(7)
    params = nnx.State(
        {
            "w": param(rng.normal(size=(2, 3, 16, 12)).astype(np.float32), EXPERT_NAMES),
            "norm": param(rng.normal(size=(2, 16)).astype(np.float32), ("layers", "embed")),
        }
    )
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]

    def run(momentum_dtype):
        tx = optimizer.build_optimizer(config(name, momentum_dtype=momentum_dtype, adam_eps=1e-8), params)
        return run_steps(tx, params, grads)

    (half, half_state), (full, _) = run("bfloat16"), run("float32")
    adam = [
        s
        for s in jax.tree.leaves(half_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    muon = [
        s
        for s in jax.tree.leaves(half_state, is_leaf=lambda x: isinstance(x, optimizer.MuonState))
        if isinstance(s, optimizer.MuonState)
    ]
    assert adam and {x.dtype for x in jax.tree.leaves(adam[0].mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam[0].nu)} == {jnp.dtype(jnp.float32)}
    if name == "muon":
        assert muon and {x.dtype for x in jax.tree.leaves(muon[0].momentum)} == {jnp.dtype(jnp.bfloat16)}
    for key in ("w", "norm"):
        moved = np.abs(np.asarray(full[key][...]) - np.asarray(params[key][...])).max()
        np.testing.assert_allclose(np.asarray(half[key][...]), np.asarray(full[key][...]), rtol=0, atol=2e-2 * moved)
        assert half[key][...].dtype == jnp.float32


def test_muon_spread_over_the_mesh_gives_the_unsharded_update():
    """Inside active rules Muon orthogonalises whole matrices spread over the mesh
    (mesh.batch_spread): on data=2 x fsdp=2 x expert=2 with ZeRO-1, a dense stack of 3 layers
    (padded to the 8 devices) and an expert stack give the single-device parameters after two
    steps, through all-to-alls, and keep their shardings."""
    from mesh.sharding import activate, param_shardings
    from trainer.state import optimizer_shardings

    mesh = jax.sharding.Mesh(
        np.array(jax.devices()).reshape(2, 2, 2),
        ("data", "fsdp", "expert"),
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
    )
    rules = (
        ("layers", None),
        ("expert", "expert"),
        ("expert_embed", "fsdp"),
        ("expert_mlp", None),
        ("embed", ("fsdp", "expert")),
        ("embed", None),
        ("mlp", None),
        ("optimizer_state", "data"),
    )
    rng = np.random.default_rng(8)
    params = nnx.State(
        {
            "experts": param(rng.normal(size=(2, 8, 16, 12)).astype(np.float32), EXPERT_NAMES),
            "dense": param(rng.normal(size=(3, 16, 24)).astype(np.float32), ("layers", "embed", "mlp")),
            "norm": param(rng.normal(size=(3, 16)).astype(np.float32), ("layers", "embed")),
        }
    )
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]
    tx = optimizer.build_optimizer(config("muon"), params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    expected, _ = run_steps(tx, params, grads)
    shardings = param_shardings(params, mesh, rules)
    state_shardings = optimizer_shardings(tx, params, shardings, mesh, rules)
    sharded = jax.device_put(params, shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(sharded)
    with activate(mesh, rules):
        sharded_step = jax.jit(step, out_shardings=(shardings, state_shardings))
        hlo = sharded_step.lower(sharded, state, grads[0]).compile().as_text()
        for g in grads:
            sharded, state = sharded_step(sharded, state, jax.device_put(g, shardings))
    assert "all-to-all" in hlo
    for key in ("experts", "dense", "norm"):
        np.testing.assert_allclose(np.asarray(sharded[key][...]), expected[key][...], rtol=2e-5, atol=1e-6)
        assert sharded[key][...].sharding.is_equivalent_to(shardings[key].get_value(), sharded[key][...].ndim), key
