"""The planner compiles a run's bfloat16 as float16 (planner/cpu_dtypes.py): which fields change, and
why. XLA:CPU turns a remat'd scan's bf16 stack of saved carries into a float32 copy of the whole stack;
with float16 it keeps the stack at 2 bytes. tests/test_step_memory.py checks the same on V4-Pro's twin."""

import re

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from planner.cpu_dtypes import as_compiled_here

LAYERS, TOKENS, WIDTH = 6, 32, 16


def test_every_bfloat16_field_and_only_those_is_compiled_as_float16():
    config = tiny.get_config()
    config.model.dtype = "bfloat16"
    config.optimizer.momentum_dtype = "bfloat16"
    config.optimizer.muon_ns_dtype = "bfloat16"
    before = config.to_dict()
    compiled, replaced = as_compiled_here(config)
    assert set(replaced) == {"model.dtype", "optimizer.momentum_dtype", "optimizer.muon_ns_dtype"}
    assert config.to_dict() == before, "the input config changed"
    expected = config.to_dict()
    for field in replaced:
        section, name = field.split(".")
        expected[section][name] = "float16"
    assert compiled.to_dict() == expected


def _scanned_gradient_hlo(dtype) -> str:
    """The compiled gradient of LAYERS remat'd scan steps over a `dtype` carry [TOKENS, WIDTH], each
    normalised in float32 as the model's layers do."""

    def loss(weights, x):
        def body(carry, w):
            h = carry.astype(jnp.float32)
            h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6)
            return carry + jnp.tanh(h @ w).astype(dtype), None

        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        out, _ = jax.lax.scan(body, x, weights)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    weights = jax.ShapeDtypeStruct((LAYERS, WIDTH, WIDTH), jnp.float32)
    x = jax.ShapeDtypeStruct((TOKENS, WIDTH), dtype)
    return jax.jit(jax.grad(loss)).lower(weights, x).compile().as_text()


def _float32_stacks(hlo: str) -> list:
    return re.findall(rf"= f32\[{LAYERS},{TOKENS},{WIDTH}\]\{{[^}}]*\}} (?:convert|fusion)\(", hlo)


@pytest.mark.parametrize("dtype, upcast", [(jnp.bfloat16, True), (jnp.float16, False)])
def test_xla_cpu_copies_a_bfloat16_saved_stack_to_float32_and_keeps_float16(dtype, upcast):
    stacks = _float32_stacks(_scanned_gradient_hlo(dtype))
    assert bool(stacks) == upcast, stacks
