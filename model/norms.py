"""RMS normalisation, always computed in float32 (the reference's precision island).

`rms_normalize` returns float32; `rms_normalized` returns the input's dtype and has its own backward,
which keeps one float32 factor per row between the passes instead of float32 copies of the input
(V4-Pro's per-head query normalisation: 1 GiB per float32 [4096, 128, 512] copy and die).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model import params


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in float32, returned in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    """[..., d] -> [..., 1] float32 1 / rms(x)."""
    x = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def rms_normalized(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, computed in float32 and returned in x's dtype."""
    return (x.astype(jnp.float32) * _inverse_rms(x, eps)).astype(x.dtype)


def _rms_normalized_forward(x, eps):
    factor = _inverse_rms(x, eps)
    return (x.astype(jnp.float32) * factor).astype(x.dtype), (x, factor)


def _rms_normalized_backward(eps, residuals, cotangent):
    """y = x r, r = 1 / rms(x): dx = r (dy - y mean(dy y)), each row's sum in float32."""
    x, factor = residuals
    y = x.astype(jnp.float32) * factor
    dy = cotangent.astype(jnp.float32)
    dx = factor * (dy - y * jnp.mean(dy * y, axis=-1, keepdims=True))
    return (dx.astype(x.dtype),)


rms_normalized.defvjp(_rms_normalized_forward, _rms_normalized_backward)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm; the weight multiplies in float32 before the cast back to the input dtype."""

    def __init__(self, width: int, name: str, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.weight = params.constant((width,), (name,), 1.0, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
        return y.astype(x.dtype)
