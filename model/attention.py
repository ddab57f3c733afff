"""Hybrid attention of one layer: sliding window, plus compressed entries for CSA (selected) and HCA (all).

One shared KV head (keys are values), low-rank queries with per-head RMS normalisation, partial RoPE,
a learned per-head sink in the softmax denominator, and a grouped low-rank output projection. Window,
compressed entries and sink share one softmax; the window is computed blockwise (O(S * (W + B)), B =
window_block), and `query_chunk` > 0 keeps only one chunk of queries' float32 scores alive. Asked for
the indexer's loss (CSA), the layer also returns the indexer's KL divergence, detached from the main
model. Block and chunk sizing: docs/model.md.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mesh.sharding import constrain
from model import params, rope
from model.args import CSA, SLIDING, ModelArgs
from model.compressor import Compressor
from model.indexer import Indexer, attention_kl
from model.layouts import NARROW_SHARDED, NARROW_WHOLE
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
    shifted = [
        jnp.pad(
            blocks[:, : max(nb - m, 0)], [(0, 0), (min(m, nb), 0)] + [(0, 0)] * (blocks.ndim - 2), constant_values=fill
        )
        for m in range(count, 0, -1)
    ]
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


def _attend(q_blocks, kv_blocks, mask, entries, usable, sink, scale, weigh_entries=False):
    """One softmax over window keys, compressed entries and sink for m blocks of B queries.

    q_blocks [b, m, B, h, c], kv_blocks [b, m, W+B, c], mask [b, m, B, W+B] bool, entries [b, n, c] or
    None, usable [b, m, B, n] bool (with entries), sink [h] -> (out [b, m, B, h, c] in q's dtype, the
    entries' probabilities summed over heads [b, m, B, n] float32 with `weigh_entries`, else None)."""
    dtype = q_blocks.dtype
    span = kv_blocks.shape[2]
    logits = jnp.einsum("bmqhc,bmkc->bmhqk", q_blocks, kv_blocks, preferred_element_type=jnp.float32) * scale
    pieces = [jnp.where(mask[:, :, None], logits, -jnp.inf)]
    if entries is not None:
        comp = jnp.einsum("bmqhc,bnc->bmhqn", q_blocks, entries, preferred_element_type=jnp.float32) * scale
        pieces.append(jnp.where(usable[:, :, None], comp, -jnp.inf))
    b, m, h, block = logits.shape[:4]
    pieces.append(jnp.broadcast_to(sink[None, None, :, None, None], (b, m, h, block, 1)))
    probs = jax.nn.softmax(jnp.concatenate(pieces, axis=-1), axis=-1)
    out = jnp.einsum("bmhqk,bmkc->bmqhc", probs[..., :span].astype(dtype), kv_blocks)
    if entries is not None:
        out = out + jnp.einsum("bmhqn,bnc->bmqhc", probs[..., span:-1].astype(dtype), entries)
    return out, jnp.sum(probs[..., span:-1], axis=2) if weigh_entries else None


def _attend_in_chunks(q_blocks, kv_blocks, mask, entries, usable, sink, scale, chunk_blocks: int, weigh_entries=False):
    """`_attend` over groups of `chunk_blocks` blocks, one group at a time, each recomputed in the
    backward pass (see the module docstring); 0 or more blocks than there are: all at once."""
    nb = q_blocks.shape[1]
    if not chunk_blocks or chunk_blocks >= nb:
        return _attend(q_blocks, kv_blocks, mask, entries, usable, sink, scale, weigh_entries)
    chunks = -(-nb // chunk_blocks)

    def split(x):
        """[b, nb, ...] -> [chunks, b, chunk_blocks, ...]; padded blocks are masked out (False / 0)."""
        x = jnp.pad(x, [(0, 0), (0, chunks * chunk_blocks - nb)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], chunks, chunk_blocks, *x.shape[2:]), 1, 0)

    def unsplit(x):
        """[chunks, b, chunk_blocks, ...] -> [b, nb, ...]."""
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], chunks * chunk_blocks, *x.shape[3:])[:, :nb]

    inputs = (q_blocks, kv_blocks, mask) + ((usable,) if entries is not None else ())
    body = jax.checkpoint(
        lambda xs: _attend(*xs[:3], entries, xs[3] if entries is not None else None, sink, scale, weigh_entries)
    )
    return jax.tree.map(unsplit, jax.lax.map(body, tuple(split(x) for x in inputs)))


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
        self.ratio = args.kind_ratios()[kind]
        self.compressor = (
            Compressor(args, c, self.ratio, overlap=kind == CSA, norm_name="head_dim", rngs=rngs)
            if kind != SLIDING
            else None
        )
        self.indexer = Indexer(args, self.ratio, rngs) if kind == CSA else None

    def __call__(
        self, u: jax.Array, positions: jax.Array, segment_ids: jax.Array, indexer_loss: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """u [b,s,d] (after attn_norm), positions and segment_ids [b,s] -> (out [b,s,d], the indexer's
        KL summed over the queries, float32 scalar: 0 unless `indexer_loss` in a CSA layer)."""
        args, dtype = self.args, u.dtype
        b, s, _ = u.shape
        window, block = args.sliding_window, args.window_block
        q_latent = self.q_norm(constrain(jnp.einsum("bsd,dr->bsr", u, self.wq_a[...].astype(dtype)), NARROW_SHARDED))
        q_latent = constrain(q_latent, NARROW_WHOLE)
        q = jnp.einsum("bsr,rhc->bshc", q_latent, self.wq_b[...].astype(dtype))
        q = rms_normalize(q, args.rms_norm_eps).astype(dtype)
        q = constrain(rope.rotate(q, positions[..., None], self._inv_freq()), HEADS)
        kv = self.kv_norm(constrain(jnp.einsum("bsd,dc->bsc", u, self.wkv[...].astype(dtype)), NARROW_SHARDED))
        kv = constrain(rope.rotate(kv, positions, self._inv_freq()), NARROW_WHOLE)
        scale = args.head_dim**-0.5

        # Query blocks of B rows, each with the W + B keys ending at it: [b, nb, B, ...].
        q_blocks = _blocks(q, block)
        kv_blocks = _with_preceding(_blocks(kv, block), window // block)
        nb = q_blocks.shape[1]
        entries = usable = None
        weigh_entries = indexer_loss and self.indexer is not None
        if self.compressor is not None:
            compressed = self.compressor(u, positions, segment_ids)
            entries = compressed.values.astype(dtype)  # [b, n, c]
            chosen = compressed.usable(positions, segment_ids, self.ratio)  # [b, s, n]
            if self.indexer is not None:
                chosen, index = self.indexer(u, q_latent, positions, segment_ids, chosen)
            usable = _blocks(chosen, block)  # [b, nb, B, n]; rows past the sequence use none
        out, attended = _attend_in_chunks(
            q_blocks,
            kv_blocks,
            _window_mask(segment_ids, window, block),
            entries,
            usable,
            self.attn_sink[...].astype(jnp.float32),
            scale,
            args.query_chunk // block,
            weigh_entries,
        )
        indexer_kl = jnp.zeros((), jnp.float32)
        if weigh_entries:
            attended = jax.lax.stop_gradient(attended.reshape(b, nb * block, -1)[:, :s])
            indexer_kl = jnp.sum(attention_kl(attended, index, chosen))
        out = out.reshape(b, nb * block, args.num_heads, -1)[:, :s]
        # Keys are values, so values carry absolute RoPE: rotate back by the query position.
        out = constrain(rope.rotate(out, positions[..., None], self._inv_freq(), inverse=True), HEADS)

        g = args.o_groups
        grouped = out.reshape(b, s, g, args.num_heads // g, args.head_dim)
        wo_a = self.wo_a[...].astype(dtype).reshape(g, args.num_heads // g, args.head_dim, args.o_lora_rank)
        low_rank = jnp.einsum("bsgnc,gncr->bsgr", grouped, wo_a)
        return jnp.einsum("bsgr,grd->bsd", low_rank, self.wo_b[...].astype(dtype)), indexer_kl

    def _inv_freq(self):
        return rope.inverse_frequencies(self.args, compressed=self.kind != SLIDING)
