"""Full remat with the recomputation after the cotangent (model/remat.py): the same values and
gradients as no remat, for every kind of layer group and the MTP layer; the recomputation is not
hoisted, so a straight-line chain of layers holds one layer's activations in its backward, not all of
them; and the planner's count of forward passes per layer."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import v4_pro
from model import remat
from model.args import from_config, layer_groups
from tests.model_configs import fresh_model


def _layer(x, w1, w2):
    """A residual MLP on [256, 128] rows whose [256, 2048] hidden activations the backward needs."""
    return x + jnp.tanh(jnp.tanh(x @ w1)) @ w2


def _chain_temporaries(wrap) -> int:
    """Compiled temporary bytes of the gradient of six `_layer`s in straight-line code, each wrapped."""

    def loss(weights, x):
        for w1, w2 in weights:
            x = wrap(_layer)(x, w1, w2)
        return jnp.sum(x**2)

    x = jax.ShapeDtypeStruct((256, 128), jnp.float32)
    weights = [(jax.ShapeDtypeStruct((128, 2048), jnp.float32), jax.ShapeDtypeStruct((2048, 128), jnp.float32))] * 6
    return jax.jit(jax.grad(loss)).lower(weights, x).compile().memory_analysis().temp_size_in_bytes


def test_recomputation_after_the_cotangent_holds_one_layer_at_a_time():
    hidden = 256 * 2048 * 4  # one [256, 2048] float32 activation
    plain = _chain_temporaries(lambda f: f)
    checkpointed = _chain_temporaries(jax.checkpoint)
    ordered = _chain_temporaries(remat.after_cotangent)
    # XLA:CPU runs jax.checkpoint's six recomputations as early as their inputs allow: all six layers'
    # activations are alive at once, as with no remat at all.
    assert checkpointed >= 12 * hidden and checkpointed == plain
    assert ordered <= 4 * hidden


def test_after_cotangent_gives_the_function_and_its_gradients():
    def fn(tree, ints, nothing):
        assert nothing is None
        y = jnp.sin(tree["a"]) * tree["b"][0] + ints.astype(jnp.float32)
        return {"y": y, "count": jnp.sum(ints)}

    tree = {"a": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4), "b": (jnp.float32(1.5),)}
    ints = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)

    def loss(wrapped, tree):
        out = wrapped(tree, ints, None)
        return jnp.sum(out["y"] ** 3), out

    (value, out), grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(remat.after_cotangent(fn), tree)
    (plain_value, plain_out), plain_grads = jax.value_and_grad(loss, argnums=1, has_aux=True)(fn, tree)
    np.testing.assert_array_equal(value, plain_value)
    chex.assert_trees_all_equal(out, plain_out)
    chex.assert_trees_all_close(grads, plain_grads, rtol=1e-6)
    assert float(jnp.abs(grads["b"][0])) > 0


def _twin_loss_and_grads(policy):
    """Loss and gradients of V4-Pro's twin (one-step, two-step and two-kind groups, MTP) in float32
    on one device, 2 x 64 tokens, under `policy`."""
    config = v4_pro.get_config("scaled").model
    config.update(remat_policy=policy, dtype="float32")
    args = from_config(config)
    graphdef, params, routing = fresh_model(args)
    tokens = (jnp.arange(128).reshape(2, 64) * 7) % args.vocab_size
    positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
    segments = jnp.ones((2, 64), jnp.int32)

    def loss(params):
        out = nnx.merge(graphdef, params, routing)(tokens, positions, segments)
        return jnp.mean(out.logits**2) + jnp.mean(out.mtp_logits[0] ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_full_remat_equals_no_remat_on_every_kind_of_group():
    kinds = {
        (len(pattern), repeats > 1)
        for pattern, repeats, _ in layer_groups(from_config(v4_pro.get_config("scaled").model))
    }
    assert kinds == {(1, True), (1, False), (2, True)}  # the full-size config's three kinds of group
    value, grads = _twin_loss_and_grads("full")
    plain_value, plain_grads = _twin_loss_and_grads("none")
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    chex.assert_trees_all_close(grads, plain_grads, rtol=1e-5, atol=1e-7)  # gradients are ~1e-3


def test_forward_passes_count_the_extra_recomputation_of_two_kind_steps():
    args = from_config(v4_pro.get_config().model)
    passes = remat.forward_passes(args)
    assert len(passes) == args.num_layers + args.num_mtp_layers == 62
    # layers 0-2 (hash groups) twice, then each (HCA, CSA) step: HCA three times, CSA twice; MTP twice
    assert passes[:3] == [2, 2, 2] and passes[3:61] == [3, 2] * 29 and passes[61] == 2
    assert remat.forward_passes(dataclasses.replace(args, remat_policy="none")) == [1] * 62
    assert remat.forward_passes(dataclasses.replace(args, remat_policy="save_dots")) == [2] * 62
