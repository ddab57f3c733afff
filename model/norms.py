"""RMS normalisation, always computed in float32 (the reference's precision island)."""

import jax
import jax.numpy as jnp
from flax import nnx

from model import params


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32, returned in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm; the weight multiplies in float32 before the cast back to the input dtype."""

    def __init__(self, width: int, name: str, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.weight = params.constant((width,), (name,), 1.0, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
        return y.astype(x.dtype)
