"""Interleaved partial RoPE on the trailing `rope_head_dim` channels of a head.

Pure sliding-window layers use the plain base; every layer with a compressor uses the compress base
with static YaRN for all of its rotations (queries, keys, compressed entries, indexer, de-rotation).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from model.args import ModelArgs


def _yarn_bound(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    """The rotary pair index whose wavelength completes `num_rotations` turns over `max_position`."""
    return (dim * math.log(max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inverse_frequencies(args: ModelArgs, compressed: bool) -> np.ndarray:
    """One angle rate per rotated pair, float32, shape [rope_head_dim // 2]."""
    dim = args.rope_head_dim
    base = args.compress_rope_theta if compressed else args.rope_theta
    # float32 throughout, as the reference computes it: angles reach thousands of radians, where one
    # ulp of the rate is visible in the result.
    wavelength_base = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    theta = (np.float32(1.0) / wavelength_base).astype(np.float32)
    if not compressed:
        return theta
    yarn = args.rope_scaling
    low = max(math.floor(_yarn_bound(yarn.beta_fast, dim, base, yarn.original_max_position_embeddings)), 0)
    high = min(math.ceil(_yarn_bound(yarn.beta_slow, dim, base, yarn.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2).astype(np.float32) - low) / np.float32(high - low), 0.0, 1.0)
    interpolated = np.float32(1.0) / (np.float32(yarn.factor) * wavelength_base)
    scaled = interpolated * ramp + theta * (np.float32(1.0) - ramp)
    return scaled.astype(np.float32)


def rotate(x: jax.Array, positions: jax.Array, inv_freq, inverse: bool = False) -> jax.Array:
    """Rotates pairs (2i, 2i+1) of the trailing rope slice of x by positions * inv_freq[i].

    x: [..., S, (heads,) D]; positions: broadcastable to x's leading dims with the S axis placed
    where x has it (callers pass [B, S] or [B, S, 1] to match). The rotation runs in float32.
    """
    rope_dim = 2 * inv_freq.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., rope_dim/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:].astype(jnp.float32)
    even, odd = rot[..., 0::2], rot[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    rotated = rotated.reshape(rot.shape).astype(x.dtype)
    return jnp.concatenate([nope, rotated], axis=-1)
