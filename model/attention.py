"""Hybrid attention of one layer: sliding window, plus compressed entries for CSA (selected) and HCA (all).

One shared KV head (keys are values), low-rank queries with per-head RMS normalisation, partial RoPE,
a learned per-head sink in the softmax denominator, and a grouped low-rank output projection.

The window is computed blockwise: the queries of a block of B rows (B = window_block, dividing the
window W) see the W + B keys that end with their block, so the cost is O(S * (W + B)) instead of
O(S^2); smaller blocks compute fewer masked-out scores (2W at B = W, 1.25W at B = W/4) in more,
smaller matmuls. Window, compressed entries and sink share one softmax.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from mesh.sharding import constrain
from model import params, rope
from model.args import CSA, HCA, SLIDING, ModelArgs
from model.compressor import Compressor
from model.indexer import Indexer
from model.norms import RMSNorm, rms_normalize

HEADS = ("act_batch", "act_length", "act_heads", "act_head_dim")


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[b, s, ...] -> [b, nb, block, ...] with s padded up to a multiple of the block."""
    s = x.shape[1]
    nb = -(-s // block)
    x = jnp.pad(x, [(0, 0), (0, nb * block - s)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], nb, block, *x.shape[2:])


def _with_preceding(blocks: jax.Array, count: int, fill=0) -> jax.Array:
    """[b, nb, B, ...] -> [b, nb, (count+1)*B, ...]: each block preceded by the `count` blocks before it
    (`fill` before the sequence start), oldest first."""
    nb = blocks.shape[1]
    shifted = [jnp.pad(blocks[:, :max(nb - m, 0)], [(0, 0), (min(m, nb), 0)] + [(0, 0)] * (blocks.ndim - 2),
                       constant_values=fill) for m in range(count, 0, -1)]
    return jnp.concatenate(shifted + [blocks], axis=2)


def _window_mask(segment_ids: jax.Array, window: int, block: int) -> jax.Array:
    """[b,s] segment ids -> [b, nb, B, W+B] bool: query q of block j (position jB+q) sees key k of its
    span (position jB-W+k) iff 0 <= distance < window and both belong to the same document (padding
    rows never match)."""
    q = jnp.arange(block)[:, None] + window
    k = jnp.arange(window + block)[None, :]
    dist = q - k
    in_window = (dist >= 0) & (dist < window)
    seg_q = _blocks(jnp.pad(segment_ids, ((0, 0), (0, -segment_ids.shape[1] % block)), constant_values=-1), block)
    seg_k = _with_preceding(seg_q, window // block, fill=-1)
    return in_window & (seg_q[..., :, None] == seg_k[..., None, :])


class Attention(nnx.Module):
    def __init__(self, args: ModelArgs, kind: str, rngs: nnx.Rngs):
        self.kind, self.args = kind, args
        d, h, c, wdt, std = args.hidden_size, args.num_heads, args.head_dim, args.weight_dtype, args.initializer_range
        g = args.o_groups
        self.wq_a = params.normal(rngs, (d, args.q_lora_rank), ("embed", "q_lora"), std, wdt)
        self.q_norm = RMSNorm(args.q_lora_rank, "q_lora", args.rms_norm_eps)
        self.wq_b = params.normal(rngs, (args.q_lora_rank, h, c), ("q_lora", "heads", "head_dim"), std, wdt)
        self.wkv = params.normal(rngs, (d, c), ("embed", "head_dim"), std, wdt)
        self.kv_norm = RMSNorm(c, "head_dim", args.rms_norm_eps)
        # wo_a[h, :, :] is head h's slice of its group's projection (group = h // (h_total / g)).
        self.wo_a = params.normal(rngs, (h, c, args.o_lora_rank), ("heads", "head_dim", "o_lora"), std, wdt)
        self.wo_b = params.normal(rngs, (g, args.o_lora_rank, d), ("o_groups", "o_lora", "embed"), std, wdt)
        self.attn_sink = params.constant((h,), ("heads",), 0.0, jnp.float32)
        ratio = {SLIDING: 0, CSA: 4, HCA: 128}[kind]
        self.ratio = ratio
        self.compressor = Compressor(args, c, ratio, "head_dim", rngs) if kind != SLIDING else None
        self.indexer = Indexer(args, ratio, rngs) if kind == CSA else None

    def __call__(self, u: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """u [b,s,d] (after attn_norm), positions and segment_ids [b,s] -> [b,s,d]."""
        args, dtype = self.args, u.dtype
        b, s, _ = u.shape
        window, block = args.sliding_window, args.window_block
        span = window + block
        q_latent = self.q_norm(jnp.einsum("bsd,dr->bsr", u, self.wq_a[...].astype(dtype)))
        q = jnp.einsum("bsr,rhc->bshc", q_latent, self.wq_b[...].astype(dtype))
        q = rms_normalize(q, args.rms_norm_eps).astype(dtype)
        q = constrain(rope.rotate(q, positions[..., None], self._inv_freq()), HEADS)
        kv = self.kv_norm(jnp.einsum("bsd,dc->bsc", u, self.wkv[...].astype(dtype)))
        kv = rope.rotate(kv, positions, self._inv_freq())
        scale = args.head_dim ** -0.5

        # Window logits, blockwise: [b, nb, h, B, W+B].
        q_blocks = _blocks(q, block)
        kv_blocks = _with_preceding(_blocks(kv, block), window // block)
        nb = q_blocks.shape[1]
        win_logits = jnp.einsum("bnqhc,bnkc->bnhqk", q_blocks, kv_blocks,
                                preferred_element_type=jnp.float32) * scale
        win_logits = jnp.where(_window_mask(segment_ids, window, block)[:, :, None], win_logits, -jnp.inf)
        win_logits = win_logits.transpose(0, 2, 1, 3, 4).reshape(b, args.num_heads, nb * block, span)

        pieces = [win_logits]
        if self.compressor is not None:
            compressed = self.compressor(u, positions, segment_ids)
            entries = compressed.values.astype(dtype)  # [b, n, c]
            usable = compressed.usable(positions, segment_ids, self.ratio)
            if self.indexer is not None:
                usable = self.indexer(u, q_latent, positions, segment_ids, usable)
            comp_logits = jnp.einsum("bshc,bnc->bhsn", q, entries, preferred_element_type=jnp.float32) * scale
            comp_logits = jnp.where(usable[:, None], comp_logits, -jnp.inf)
            pieces.append(jnp.pad(comp_logits, ((0, 0), (0, 0), (0, nb * block - s), (0, 0)),
                                  constant_values=-jnp.inf))
        sink = jnp.broadcast_to(self.attn_sink[...].astype(jnp.float32)[None, :, None, None],
                                (b, args.num_heads, nb * block, 1))
        probs = jax.nn.softmax(jnp.concatenate(pieces + [sink], axis=-1), axis=-1)

        win_probs = probs[..., :span].reshape(b, args.num_heads, nb, block, span)
        out = jnp.einsum("bhnqk,bnkc->bnqhc", win_probs.astype(dtype), kv_blocks)
        out = out.reshape(b, nb * block, args.num_heads, -1)[:, :s]
        if self.compressor is not None:
            comp_probs = probs[:, :, :s, span:-1]
            out = out + jnp.einsum("bhsn,bnc->bshc", comp_probs.astype(dtype), entries)
        # Keys are values, so values carry absolute RoPE: rotate back by the query position.
        out = constrain(rope.rotate(out, positions[..., None], self._inv_freq(), inverse=True), HEADS)

        g = args.o_groups
        grouped = out.reshape(b, s, g, args.num_heads // g, args.head_dim)
        wo_a = self.wo_a[...].astype(dtype).reshape(g, args.num_heads // g, args.head_dim, args.o_lora_rank)
        low_rank = jnp.einsum("bsgnc,gncr->bsgr", grouped, wo_a)
        return jnp.einsum("bsgr,grd->bsd", low_rank, self.wo_b[...].astype(dtype))

    def _inv_freq(self):
        return rope.inverse_frequencies(self.args, compressed=self.kind != SLIDING)
