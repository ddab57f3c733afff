"""KV compressor: every `ratio` tokens of a document become one KV entry by a learned, per-channel
softmax pooling.

Two schemes share this module, at any ratio > 1 (the release uses 128 and 4). Plain (HCA): entry i pools
the tokens of block i. Overlapping (CSA and the indexer): projections have two halves; entry i pools the
previous block through the first half and its own block through the second half, so each entry sees
2*ratio tokens at stride ratio.

Rows may pack several documents (segment ids, per-document positions). Blocks are counted from each
document's own start, only complete blocks are compressed (a shorter tail is dropped), and a
document's first entry has no previous block. Entries are laid out in row order; a row of s tokens
holds at most s // ratio complete blocks, which fixes the entries' static count. Computed in float32.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mesh.sharding import constrain
from model import params, rope
from model.args import ModelArgs
from model.layouts import NARROW_SHARDED, NARROW_WHOLE
from model.norms import RMSNorm


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Entries:
    """Compressed entries of a row: values [b,n,w] f32, and per entry the document (segment id, 0 for an
    unused slot) and the position of its block's first token [b,n] int32."""

    values: jax.Array
    segment: jax.Array
    position: jax.Array

    def usable(self, positions: jax.Array, segment_ids: jax.Array, ratio: int) -> jax.Array:
        """[b,s] queries -> [b,s,n] bool: same document, and the entry's block ends at or before t."""
        same_doc = (self.segment[:, None, :] == segment_ids[:, :, None]) & (self.segment[:, None, :] > 0)
        complete = self.position[:, None, :] + ratio <= positions[:, :, None] + 1
        return same_doc & complete


def _block_ids(positions, segment_ids, ratio, num_entries):
    """Each token's entry slot in [0, n) for tokens of complete blocks, else n (dropped): [b,s]."""
    b, s = positions.shape
    offset = positions % ratio
    rows = jnp.arange(s)[None, :]
    last = rows + (ratio - 1 - offset)  # row of the block's last token if the block is complete
    last_clipped = jnp.minimum(last, s - 1)
    take = lambda a: jnp.take_along_axis(a, last_clipped, axis=1)
    complete = (
        (last < s)
        & (take(segment_ids) == segment_ids)
        & (segment_ids > 0)
        & (take(positions) == positions + (ratio - 1 - offset))
    )
    starts = complete & (offset == 0)
    ordinal = jnp.cumsum(starts, axis=1) - 1  # entry index of each block start, in row order
    first = jnp.maximum(rows - offset, 0)
    return jnp.where(complete, jnp.take_along_axis(ordinal, first, axis=1), num_entries)


def _per_row(segment_op, values, ids, num_segments):
    """segment_op over each row: values [b,s,...], ids [b,s] -> [b, num_segments, ...]. Row by row (vmap,
    a scatter with a batch dim), not over ids flattened across the batch: the partitioner keeps a
    batched scatter split by rows, while a flat one it computes whole on every device and all-reduces."""
    return jax.vmap(lambda v, i: segment_op(v, i, num_segments))(values, ids)


def _pool_stats(values, scores, ids, num_segments):
    """Per-entry softmax pooling parts over tokens grouped by `ids` [b,s]: (max, sum exp, sum exp*value),
    each [b, num_segments, channels]."""
    peak = jax.lax.stop_gradient(_per_row(jax.ops.segment_max, scores, ids, num_segments))
    weights = jnp.exp(scores - jnp.take_along_axis(peak, ids[..., None], axis=1))
    return (
        peak,
        _per_row(jax.ops.segment_sum, weights, ids, num_segments),
        _per_row(jax.ops.segment_sum, weights * values, ids, num_segments),
    )


class Compressor(nnx.Module):
    def __init__(self, args: ModelArgs, width: int, ratio: int, overlap: bool, norm_name: str, rngs: nnx.Rngs):
        """Pools every `ratio` tokens into one entry of `width` channels; `overlap`: the CSA scheme."""
        self.ratio, self.width, self.overlap, self.args = ratio, width, overlap, args
        channels = 2 * width if self.overlap else width
        d, wdt = args.hidden_size, args.weight_dtype
        self.wkv = params.normal(rngs, (d, channels), ("embed", "kv_comp"), args.initializer_range, wdt)
        self.wgate = params.normal(rngs, (d, channels), ("embed", "kv_comp"), args.initializer_range, wdt)
        self.ape = params.constant((ratio, channels), ("comp_pos", "kv_comp"), 0.0, jnp.float32)
        self.norm = RMSNorm(width, norm_name, args.rms_norm_eps)

    def __call__(self, u: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> Entries:
        """u [b,s,d], positions and segment_ids [b,s] -> Entries with n = s // ratio slots."""
        s = u.shape[1]
        m, w = self.ratio, self.width
        n = s // m
        x = u.astype(jnp.float32)
        project = lambda w: constrain(jnp.einsum("bsd,dc->bsc", x, w[...].astype(jnp.float32)), NARROW_SHARDED)
        kv = constrain(project(self.wkv), NARROW_WHOLE)
        gate = constrain(project(self.wgate) + self.ape[...][positions % m], NARROW_WHOLE)
        # Entry slot per token; slot n of each row collects the dropped tokens.
        ids = _block_ids(positions, segment_ids, m, n)
        count = n + 1
        unflat = lambda a: a[:, :n]
        segment = unflat(_per_row(jax.ops.segment_max, segment_ids, ids, count))
        first_position = unflat(_per_row(jax.ops.segment_min, positions, ids, count))
        used = segment > 0
        segment = jnp.where(used, segment, 0)
        first_position = jnp.where(used, first_position, 0)
        if self.overlap:
            # Own block through the second half; the previous block of the same document through the first.
            peak, total, weighted = (unflat(a) for a in _pool_stats(kv[..., w:], gate[..., w:], ids, count))
            peak = jnp.where(used[..., None], peak, 0.0)  # empty slots: keep every term finite
            prev_peak, prev_total, prev_weighted = (
                jnp.pad(unflat(a)[:, :-1], ((0, 0), (1, 0), (0, 0)))
                for a in _pool_stats(kv[..., :w], gate[..., :w], ids, count)
            )
            has_prev = (first_position >= m)[..., None]
            prev_peak = jnp.where(has_prev, prev_peak, -jnp.inf)
            joint = jnp.maximum(peak, prev_peak)
            own_scale, prev_scale = jnp.exp(peak - joint), jnp.where(has_prev, jnp.exp(prev_peak - joint), 0.0)
            total = total * own_scale + prev_total * prev_scale
            weighted = weighted * own_scale + prev_weighted * prev_scale
        else:
            _, total, weighted = (unflat(a) for a in _pool_stats(kv, gate, ids, count))
        pooled = jnp.where(used[..., None], weighted / jnp.where(used[..., None], total, 1.0), 0.0)
        pooled = rope.rotate(self.norm(pooled), first_position, rope.inverse_frequencies(self.args, compressed=True))
        return Entries(values=pooled, segment=segment, position=first_position)
