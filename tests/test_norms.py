"""model/norms.py's `rms_normalized` (its own backward) against the float32 formula differentiated by
JAX: value and gradient, for float32 and bfloat16 inputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.norms import rms_normalized

EPS = 1e-6


def _reference(x, eps):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def _loss(normalise, x, weights):
    return jnp.sum(normalise(x, EPS).astype(jnp.float32) * weights)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_value_and_gradient_equal_the_float32_formula(dtype, tolerance):
    keys = jax.random.split(jax.random.key(0), 3)
    x = (3.0 * jax.random.normal(keys[0], (2, 5, 3, 64)) + 0.5).astype(dtype)
    weights = jax.random.normal(keys[1], (2, 5, 3, 64))
    value = rms_normalized(x, EPS)
    assert value.dtype == dtype
    chex.assert_trees_all_close(
        value.astype(jnp.float32), _reference(x, EPS).astype(dtype).astype(jnp.float32), rtol=tolerance, atol=tolerance
    )
    gradient = jax.grad(_loss, argnums=1)(rms_normalized, x, weights)
    expected = jax.grad(lambda x: jnp.sum(_reference(x, EPS) * weights))(x.astype(jnp.float32))
    assert gradient.dtype == dtype
    scale = float(jnp.max(jnp.abs(expected)))
    chex.assert_trees_all_close(
        gradient.astype(jnp.float32), expected.astype(dtype).astype(jnp.float32), rtol=tolerance, atol=tolerance * scale
    )
    # A gradient that ignores the normalisation's own dependence on x is off by far more.
    wrong = weights * jax.lax.rsqrt(jnp.mean(x.astype(jnp.float32) ** 2, axis=-1, keepdims=True) + EPS)
    assert float(jnp.max(jnp.abs(wrong - expected))) > 10 * tolerance * scale


def test_rows_of_zeros_stay_finite():
    x = jnp.zeros((4, 8), jnp.bfloat16)
    gradient = jax.grad(lambda x: jnp.sum(rms_normalized(x, EPS).astype(jnp.float32)))(x)
    assert np.all(np.isfinite(np.asarray(gradient, np.float32)))
