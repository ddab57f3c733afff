"""Token embedding lookup on the sharded table: rows gathered where they live, gradient scattered into
each device's own shard, never a whole float32 table on one device.

The table [vocab, d] is sharded as its logical names say (`vocab` -> tensor, `embed` -> fsdp x
expert under the shipped rules); left to the SPMD partitioner, `jnp.take` gathers it whole (and its
gradient is a whole-table scatter). Here, under a full-manual `jax.shard_map`: each device gathers the
token ids of its `embed` group (int32, small), looks up its own [vocab/tp, d/e] slice of the rows for
all of them, sums the vocabulary shards (a row lives on one of them: psum over the vocab axes, or
psum_scatter back onto the sequence shards when sequence parallelism splits the tokens over the same
axes), and an all-to-all over the `embed` axes turns "every token of the group, my d slice" into "my
tokens, all of d". Autodiff runs the same path backward: all-to-all, then a scatter-add into the
local shard. It needs the `embed` axes among the axes that split the rows of the batch, and the
vocab axes off them (true of every shipped layout); otherwise `lookup` falls back to `jnp.take`.
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from mesh.axes import mesh_axes_of
from mesh.sharding import active, resolve_spec
from model.layouts import TOKENS

TABLE_NAMES = ("vocab", "embed")


def _local_lookup(table, tokens, *, dtype, embed_axes, vocab_axes, length_over_vocab):
    """One device: table [v/tp, d/e], tokens [b', s'] -> [b', s', d] in dtype. length_over_vocab: the
    tokens' sequence dim is split over the vocab axes too (sequence parallelism)."""
    ids = lax.all_gather(tokens, embed_axes, axis=0, tiled=True) if embed_axes else tokens  # [b'*e, s']
    if length_over_vocab:
        ids = lax.all_gather(ids, vocab_axes, axis=1, tiled=True)  # [b'*e, s'*tp]
    if vocab_axes:
        rows = table.shape[0]
        local = ids - lax.axis_index(vocab_axes) * rows
        mine = (local >= 0) & (local < rows)
        found = jnp.where(mine[..., None], jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0), 0.0)
        found = (
            lax.psum_scatter(found, vocab_axes, scatter_dimension=1, tiled=True)
            if length_over_vocab
            else lax.psum(found, vocab_axes)
        )  # a row lives on one shard
    else:
        found = jnp.take(table, ids, axis=0)  # [b'*e, s', d/e]
    found = found.astype(dtype)
    if embed_axes:
        found = lax.all_to_all(found, embed_axes, 0, 2, tiled=True)  # [b', s', d]
    return found


def lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """table [vocab, d], tokens [b, s] int -> [b, s, d] in `dtype`, laid out as TOKENS."""
    current = active()
    if current is None:
        return jnp.take(table, tokens, axis=0).astype(dtype)
    mesh, rules = current
    sizes = dict(mesh.shape)
    table_spec = resolve_spec("embedding table", TABLE_NAMES, table.shape, sizes, rules)
    out_spec = resolve_spec(
        "embedded tokens", TOKENS, tokens.shape + table.shape[1:], sizes, rules, indivisible_falls_back=True
    )
    split = lambda entry: {a for a in mesh_axes_of(entry) if sizes[a] > 1}
    batch_axes, length_axes = split(out_spec[0]), split(out_spec[1])
    vocab_axes = tuple(a for a in mesh_axes_of(table_spec[0]) if sizes[a] > 1)
    embed_axes = tuple(a for a in mesh_axes_of(table_spec[1]) if sizes[a] > 1)
    length_over_vocab = bool(vocab_axes) and length_axes == set(vocab_axes)
    if (
        not set(embed_axes) <= batch_axes
        or batch_axes & set(vocab_axes)
        or split(out_spec[2])
        or (length_axes & set(vocab_axes) and not length_over_vocab)
    ):
        return jnp.take(table, tokens, axis=0).astype(dtype)
    body = jax.shard_map(
        lambda t, ids: _local_lookup(
            t, ids, dtype=dtype, embed_axes=embed_axes, vocab_axes=vocab_axes, length_over_vocab=length_over_vocab
        ),
        mesh=mesh,
        in_specs=(table_spec, PartitionSpec(*tuple(out_spec)[:2])),
        out_specs=out_spec,
    )
    return body(table, tokens)
