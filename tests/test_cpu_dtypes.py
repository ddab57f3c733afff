"""The planner compiles a run's bfloat16 as float16 (planner/cpu_dtypes.py): which fields change, and
why. XLA:CPU turns a remat'd scan's bf16 stack of saved carries into a float32 copy of the whole stack;
with float16 it keeps the stack at 2 bytes (tests/test_step_memory.py checks the same on V4-Pro's twin);
and with oneDNN a float16 matmul runs without float32 copies."""

import re

import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from planner.cpu_dtypes import COMPILER_OPTIONS, as_compiled_here

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


def _float16_dot_temporaries(options) -> int:
    """Temporary bytes of a [256, 128] x [128, 512] float16 matmul with a float16 result."""
    a = jax.ShapeDtypeStruct((256, 128), jnp.float16)
    b = jax.ShapeDtypeStruct((128, 512), jnp.float16)
    compiled = jax.jit(jnp.matmul).lower(a, b).compile(compiler_options=options)
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_planner_compiles_float16_matmuls_on_their_float16_operands():
    # XLA:CPU alone copies both operands to float32 (and multiplies there); with oneDNN it makes no copy.
    assert _float16_dot_temporaries(None) >= 4 * (256 * 128 + 128 * 512)
    assert _float16_dot_temporaries(COMPILER_OPTIONS) == 0
