"""Logical names -> NamedShardings for nnx parameter trees, and the project's rules."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import parallelism
from mesh import axes
from mesh.layout import plan_layout
from mesh.presets import get_topology
from mesh.sharding import activate, constrain, logical_to_spec, param_shardings

RULES = parallelism.RULES


def override(name, target):
    """The default rules with `name` mapped to `target` only."""
    return tuple((n, t) for n, t in RULES if n != name) + ((name, target),)


class Block(nnx.Module):
    def __init__(self, rngs, width=16, hidden=32, experts=4):
        init = nnx.initializers.normal()
        self.up = nnx.Param(init(rngs.params(), (width, hidden)), out_sharding=("embed", "mlp"), eager_sharding=False)
        self.experts = nnx.Param(
            init(rngs.params(), (experts, width, hidden)),
            out_sharding=("expert", "expert_embed", "expert_mlp"),
            eager_sharding=False,
        )
        self.norm = nnx.Param(jnp.ones((width,)), out_sharding=(None,), eager_sharding=False)


class Model(nnx.Module):
    def __init__(self, rngs, layers=3):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stack(rngs):
            return Block(rngs)

        self.blocks = stack(rngs)
        self.embedding = nnx.Param(
            nnx.initializers.normal()(rngs.params(), (64, 16)), out_sharding=("vocab", "embed"), eager_sharding=False
        )


def mesh_for(**sizes):
    return plan_layout(get_topology("cm384-8"), sizes).mesh()


def test_rules_cover_every_logical_name():
    names = [name for name, _ in parallelism.RULES]
    assert sorted(set(names)) == sorted(axes.LOGICAL_AXES)
    for name in set(names):  # a name with several rules ends with the replicated fallback
        targets = [target for n, target in parallelism.RULES if n == name]
        assert len(targets) == 1 or targets[-1] is None, name
    for _, target in parallelism.RULES:
        targets = () if target is None else (target,) if isinstance(target, str) else target
        assert set(targets) <= set(axes.MESH_AXES)


def test_stacked_module_gets_layer_axis_and_rules():
    mesh = mesh_for(fsdp=2, expert=2, tensor=2)
    state = nnx.state(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
    shardings = param_shardings(state, mesh, parallelism.RULES)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)
    specs = {"/".join(map(str, path)): v.get_value().spec for path, v in nnx.to_flat_state(shardings)}
    assert specs == {
        "blocks/up": P(None, ("fsdp", "expert"), "tensor"),
        "blocks/experts": P(None, "expert", "fsdp", "tensor"),
        "blocks/norm": P(None, None),
        "embedding": P("tensor", ("fsdp", "expert")),
    }


def test_born_sharded_with_jit_out_shardings():
    mesh = mesh_for(fsdp=2, expert=2, tensor=2)
    abstract = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
    shardings = param_shardings(nnx.state(abstract), mesh, parallelism.RULES)
    state = jax.jit(lambda: nnx.state(Model(nnx.Rngs(0))), out_shardings=shardings)()
    experts = state["blocks"]["experts"].get_value()
    assert experts.sharding.spec == P(None, "expert", "fsdp", "tensor")
    assert experts.addressable_shards[0].data.shape == (3, 2, 8, 16)
    reference = nnx.state(Model(nnx.Rngs(0)))["blocks"]["experts"].get_value()
    np.testing.assert_allclose(np.asarray(experts), np.asarray(reference), rtol=1e-6)


def abstract_param(shape, names):
    return nnx.State(
        {"w": nnx.Param(jax.ShapeDtypeStruct(shape, jnp.float32), out_sharding=names, eager_sharding=False)}
    )


@pytest.mark.parametrize(
    "shape, names, rules, message",
    [
        ((16,), None, RULES, "parameter w: no logical axis names"),
        ((16, 32), ("embed", "nonsense"), RULES, "parameter w: logical axis 'nonsense' (dim 1) has no rule"),
        (
            (16, 32),
            ("embed", "mlp"),
            override("mlp", "fsdp"),
            "every rule of dim 1 ('mlp') needs a mesh axis already taken ('fsdp' by dim 0 ('embed'))",
        ),
        (
            (6, 32),
            ("embed", "mlp"),
            RULES,
            "parameter w (6, 32): dim 0 ('embed') has size 6, not divisible by 4 = mesh axes "
            "('fsdp', 'expert') of sizes [2, 2]",
        ),
        ((16,), ("embed",), override("embed", "sequence"), "names mesh axis 'sequence', absent"),
        ((16, 32), ("embed",), RULES, "1 logical names ('embed',) for 2-d shape (16, 32)"),
    ],
)
def test_errors_name_parameter_dimension_and_sizes(shape, names, rules, message):
    mesh = mesh_for(fsdp=2, expert=2, tensor=2)
    with pytest.raises((ValueError, KeyError), match=re.escape(message)):
        param_shardings(abstract_param(shape, names), mesh, rules)


def test_full_size_v4_pro_experts_on_an_abstract_cm384():
    """V4-Pro routed experts, 61 stacked layers of [384, 7168, 3072], on 768 dies, no devices."""
    layout = plan_layout(get_topology("cm384"), dict(data=1, expert=384, fsdp=2, tensor=1), pins=dict(fsdp="chip"))
    mesh = layout.abstract_mesh()
    experts = abstract_param((61, 384, 7168, 3072), ("layers", "expert", "expert_embed", "expert_mlp"))
    sharding = param_shardings(experts, mesh, parallelism.RULES)["w"].get_value()
    assert sharding.shard_shape((61, 384, 7168, 3072)) == (61, 1, 3584, 3072)
    # V4 width 7168 = 2^10 x 7 cannot be split 768 ways: the rules say so instead of replicating.
    embedding = abstract_param((129280, 7168), ("vocab", "embed"))
    with pytest.raises(ValueError, match=re.escape("size 7168, not divisible by 768")):
        param_shardings(embedding, mesh, parallelism.RULES)


def test_fallback_rule_when_the_first_choice_is_taken():
    """wq_b has no embed dim, so q_lora takes (fsdp, expert); in wq_a embed took them first."""
    mesh = mesh_for(fsdp=2, expert=2, tensor=2)
    wq_a = param_shardings(abstract_param((16, 32), ("embed", "q_lora")), mesh, parallelism.RULES)
    wq_b = param_shardings(abstract_param((32, 4, 8), ("q_lora", "heads", "head_dim")), mesh, parallelism.RULES)
    assert wq_a["w"].get_value().spec == P(("fsdp", "expert"), None)
    assert wq_b["w"].get_value().spec == P(("fsdp", "expert"), "tensor", None)


def test_activations_indivisible_by_their_first_rule_take_the_next():
    """A sampled sequence of odd length stays whole instead of failing sequence parallelism; a name
    with no further rule (the batch) and a parameter (where 6 % 4 fails, test above) still refuse."""
    mesh = mesh_for(fsdp=2, expert=2, tensor=2)
    tokens = ("act_batch", "act_stream_length", "act_embed")
    with activate(mesh, RULES):
        even = jax.jit(lambda v: constrain(v, tokens))(jnp.zeros((4, 6, 8)))
        odd = jax.jit(lambda v: constrain(v, tokens))(jnp.zeros((4, 7, 8)))
        with pytest.raises(ValueError, match=re.escape("dim 0 ('act_batch') has size 3, not divisible by 4")):
            constrain(jnp.zeros((3, 6, 8)), tokens)
    assert even.sharding.is_equivalent_to(NamedSharding(mesh, P(("fsdp", "expert"), "tensor", None)), 3)
    assert odd.sharding.is_equivalent_to(NamedSharding(mesh, P(("fsdp", "expert"), None, None)), 3)


def test_constrain_applies_rules_only_when_active():
    mesh = mesh_for(data=2, fsdp=2, tensor=2)
    x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
    assert constrain(x, ("act_batch", "act_embed")) is x
    with activate(mesh, parallelism.RULES):
        y = jax.jit(lambda v: constrain(v * 2, ("act_batch", "act_heads")))(x)
    expected = NamedSharding(mesh, P(("data", "fsdp", "expert"), "tensor"))
    assert y.sharding.is_equivalent_to(expected, y.ndim)
    np.testing.assert_allclose(np.asarray(y), 2 * np.asarray(x))
    assert logical_to_spec(("act_batch", None), RULES) == P(("data", "fsdp", "expert"), None)
