"""KV compressor: every `ratio` tokens become one KV entry by a learned, per-channel softmax pooling.

Two schemes share this module. Plain (HCA, ratio 128): entry i pools the tokens of block i. Overlapping
(CSA and the indexer, ratio 4): projections have two halves; entry i pools the previous block through the
first half and its own block through the second half, so each entry sees 2*ratio tokens at stride ratio.
Only complete blocks are compressed. Computed in float32.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from model import params
from model.args import ModelArgs
from model.norms import RMSNorm
from model import rope


class Compressor(nnx.Module):
    def __init__(self, args: ModelArgs, width: int, ratio: int, norm_name: str, rngs: nnx.Rngs):
        self.ratio, self.width, self.overlap = ratio, width, ratio == 4
        channels = 2 * width if self.overlap else width
        d, wdt = args.hidden_size, args.weight_dtype
        self.wkv = params.normal(rngs, (d, channels), ("embed", "kv_comp"), args.initializer_range, wdt)
        self.wgate = params.normal(rngs, (d, channels), ("embed", "kv_comp"), args.initializer_range, wdt)
        self.ape = params.constant((ratio, channels), ("comp_pos", "kv_comp"), 0.0, jnp.float32)
        self.norm = RMSNorm(width, norm_name, args.rms_norm_eps)
        self.args = args

    def __call__(self, u: jax.Array) -> jax.Array:
        """u [b,s,d] -> entries [b, s // ratio, width] (float32), entry i roped at position i*ratio."""
        b, s, _ = u.shape
        m, w = self.ratio, self.width
        n = s // m
        if n == 0:  # shorter than one block: nothing to compress yet
            return jnp.zeros((b, 0, w), jnp.float32)
        x = u[:, :n * m].astype(jnp.float32)
        kv = jnp.einsum("bsd,dc->bsc", x, self.wkv[...].astype(jnp.float32)).reshape(b, n, m, -1)
        gate = jnp.einsum("bsd,dc->bsc", x, self.wgate[...].astype(jnp.float32)).reshape(b, n, m, -1)
        gate = gate + self.ape[...]
        if self.overlap:
            # Slots [previous block through the first half | own block through the second half].
            prev_kv = jnp.pad(kv[:, :-1, :, :w], ((0, 0), (1, 0), (0, 0), (0, 0)))
            prev_gate = jnp.pad(gate[:, :-1, :, :w], ((0, 0), (1, 0), (0, 0), (0, 0)), constant_values=-jnp.inf)
            kv = jnp.concatenate([prev_kv, kv[..., w:]], axis=2)
            gate = jnp.concatenate([prev_gate, gate[..., w:]], axis=2)
        pooled = jnp.sum(kv * jax.nn.softmax(gate, axis=2), axis=2)  # [b, n, w]
        pooled = self.norm(pooled)
        positions = jnp.arange(n, dtype=jnp.int32)[None, :] * m
        return rope.rotate(pooled, positions, self._inv_freq())

    def _inv_freq(self):
        return rope.inverse_frequencies(self.args, compressed=True)
