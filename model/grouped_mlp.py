"""Expert MLP over the occupied tiles of padded per-expert buffers, and nothing else.

Static shapes force the dispatch's buffers to the worst case (dropless: a source may send all its
tokens to one expert), so most rows are empty. Multiplying whole buffers costs E/k times the routed
work; here a while loop visits only the `tile`-row tiles that hold routed rows, so the work done is the
routed rows rounded up to whole tiles per chunk. A while loop with a data-dependent trip count has no
reverse-mode derivative, so a custom VJP walks the same tiles again for the gradients. The forward
loop keeps each tile's gate and up projections (float32, in [G, R, I] buffers laid out like x), what
autodiff of an unrolled MLP would store, so the backward loop runs only the six gradient matmuls and
the SwiGLU's derivative instead of also recomputing the two input matmuls (a quarter of its matmuls).
Under remat the forward loop is rerun once to rebuild them, as for any other activation. Their cost is
8*I bytes per buffer row, alive from a layer's forward to its backward (one layer at a time under
remat): about 1.7x the bf16 x buffer at V4 widths (I=3072, d=7168), so the worst-case-sized dropless
buffers grow accordingly; capacity-factor buffers stay small.

Layout: x [G, R, d] holds G chunks of R rows; chunk g's first counts[g] rows are real, the rest are
ignored (their outputs and gradients are zero). Chunk g uses expert g // chunks_per_expert of the
local weights w1/w3 [El, d, I], w2 [El, I, d] (the dispatch's chunks are (local expert, source rank)).

Cost accounting: XLA's cost analysis counts a while body once whatever its trip count. The number of
tiles a call runs is `occupied_tiles(counts, tile)`; the dispatch reports it, and the FLOPs of one
forward and one backward tile (`tile_bodies`) give the exact executed count.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from model.activations import clamped_swiglu


def chunk_tile(rows: int, tile: int) -> int:
    """The tile run on chunks of `rows` rows when `tile` is asked for: the ceil(rows / tile) tiles a
    chunk needs, each just long enough to cover it, so a chunk is padded by fewer rows than it has
    tiles (an 80-row chunk with tile 128 runs one 80-row tile, not a 128-row one of which 48 rows
    are padding)."""
    tiles = -(-rows // tile)
    return -(-rows // tiles)


def occupied_tiles(counts: jax.Array, tile: int) -> jax.Array:
    """counts [G] -> tiles the op runs (int32 scalar)."""
    return jnp.sum((counts + tile - 1) // tile).astype(jnp.int32)


def _tile_forward(x, weight, mask, w1, w3, w2, limit):
    """One tile: x [T,d], weight [T] f32, mask [T] bool, w1/w3 [d,I], w2 [I,d] ->
    (y [T,d], gate [T,I], up [T,I]), all float32.

    Matmuls in x.dtype with float32 accumulation; the routing weight scales h before w2 (masked rows
    get weight 0, so their outputs and every gradient through them are 0)."""
    gate = jnp.dot(x, w1, preferred_element_type=jnp.float32)
    up = jnp.dot(x, w3, preferred_element_type=jnp.float32)
    return _tile_output(gate, up, weight, mask, w2, limit, x.dtype), gate, up


def _tile_output(gate, up, weight, mask, w2, limit, dtype):
    """gate/up [T,I] f32 -> y [T,d] f32: the part of a tile after its input projections."""
    h = (clamped_swiglu(gate, up, limit) * jnp.where(mask, weight, 0.0)[:, None]).astype(dtype)
    return jnp.dot(h, w2, preferred_element_type=jnp.float32)


def _tile_backward(x, weight, mask, gate, up, w1, w3, w2, dy, limit):
    """Gradients of one tile from its saved gate/up: dy [T,d] f32 -> (dx, dweight, dw1, dw3, dw2)."""
    _, output_pullback = jax.vjp(
        lambda g, u, wt, w: _tile_output(g, u, wt, mask, w, limit, x.dtype), gate, up, weight, w2
    )
    dgate, dup, dweight, dw2 = output_pullback(dy)
    # The projections' primal outputs are unused here (XLA drops them); only their transposes run.
    _, input_pullback = jax.vjp(
        lambda a, b, c: (
            jnp.dot(a, b, preferred_element_type=jnp.float32),
            jnp.dot(a, c, preferred_element_type=jnp.float32),
        ),
        x,
        w1,
        w3,
    )
    dx, dw1, dw3 = input_pullback((dgate, dup))
    return dx, dweight, dw1, dw3, dw2


def _tile_plan(counts, tile):
    """-> (number of occupied tiles, locate(i) -> (chunk, first row, row mask [T]))."""
    per_chunk = (counts + tile - 1) // tile
    ends = jnp.cumsum(per_chunk)

    def locate(i):
        chunk = jnp.searchsorted(ends, i, side="right")
        start = (i - (ends[chunk] - per_chunk[chunk])) * tile
        return chunk, start, start + jnp.arange(tile) < counts[chunk]

    return ends[-1], locate


def _read(a, chunk, start, tile):
    """a [G, R, ...] -> rows start..start+tile of chunk: [T, ...]."""
    index = (chunk, start) + (0,) * (a.ndim - 2)
    return lax.dynamic_slice(a, index, (1, tile) + a.shape[2:])[0]


def _write(a, value, chunk, start):
    index = (chunk, start) + (0,) * (a.ndim - 2)
    return lax.dynamic_update_slice(a, value[None].astype(a.dtype), index)


def _varying(*arrays) -> tuple:
    """Mesh axes over which any of `arrays` varies inside shard_map (none outside it)."""
    return tuple(sorted(frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))))


def _vary(a, axes):
    """`a` typed as varying over `axes` (a no-op for axes it already varies over)."""
    missing = tuple(axis for axis in axes if axis not in _varying(a))
    return lax.pcast(a, missing, to="varying") if missing else a


def _zeros(shape, dtype, axes):
    """A loop carry: zeros typed as varying over `axes`, as the loop body's updates are."""
    return _vary(jnp.zeros(shape, dtype), axes)


def _sum_to(gradient, like):
    """A gradient summed over the mesh axes its primal `like` is replicated over (what autodiff's
    transpose of the implicit broadcast does)."""
    extra = tuple(a for a in _varying(gradient) if a not in _varying(like))
    return lax.psum(gradient, extra) if extra else gradient


def _pad_rows(a, tile):
    """Pad the row axis (1) to a multiple of the tile so every tile lies inside its chunk."""
    extra = -a.shape[1] % tile
    return jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2)) if extra else a


def _forward_loop(x, weights, counts, w1, w3, w2, chunks_per_expert, tile, limit, keep: bool):
    """-> y [G,R,d] f32, and with `keep` also the gate/up buffers [G,R,I] f32 of the tiles run."""
    total, locate = _tile_plan(counts, tile)
    axes = _varying(x, weights, counts, w1, w3, w2)
    inner = w1.shape[-1]
    buffers = (_zeros(x.shape, jnp.float32, axes),) + (
        (_zeros(x.shape[:2] + (inner,), jnp.float32, axes),) * 2 if keep else ()
    )

    def body(i, outputs):
        chunk, start, mask = locate(i)
        e = chunk // chunks_per_expert
        tile_outputs = _tile_forward(
            _read(x, chunk, start, tile), _read(weights, chunk, start, tile), mask, w1[e], w3[e], w2[e], limit
        )
        return tuple(_write(buffer, value, chunk, start) for buffer, value in zip(outputs, tile_outputs))

    return lax.fori_loop(0, total, body, buffers)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _expert_mlp(x, weights, counts, w1, w3, w2, chunks_per_expert, tile, limit):
    return _forward_loop(x, weights, counts, w1, w3, w2, chunks_per_expert, tile, limit, keep=False)[0]


def _expert_mlp_forward(x, weights, counts, w1, w3, w2, chunks_per_expert, tile, limit):
    y, gate, up = _forward_loop(x, weights, counts, w1, w3, w2, chunks_per_expert, tile, limit, keep=True)
    return y, (x, weights, counts, w1, w3, w2, gate, up)


def _expert_mlp_backward(chunks_per_expert, tile, limit, residuals, dy):
    x, weights, counts, w1, w3, w2, gate, up = residuals
    total, locate = _tile_plan(counts, tile)

    def body(i, grads):
        dx, dweights, dw1, dw3, dw2 = grads
        chunk, start, mask = locate(i)
        e = chunk // chunks_per_expert
        # Every input made varying over all axes, so the pullbacks return per-device partial sums
        # (no collective per tile); they are summed over replicated axes once, after the loop.
        rows = (_read(a, chunk, start, tile) for a in (x, weights))
        saved = (_read(a, chunk, start, tile) for a in (gate, up))
        gx, gweights, g1, g3, g2 = _tile_backward(
            *(_vary(a, axes) for a in rows),
            mask,
            *(_vary(a, axes) for a in saved),
            *(_vary(a[e], axes) for a in (w1, w3, w2)),
            _vary(_read(dy, chunk, start, tile), axes),
            limit,
        )
        return (
            _write(dx, gx, chunk, start),
            _write(dweights, gweights, chunk, start),
            dw1.at[e].add(g1.astype(jnp.float32)),
            dw3.at[e].add(g3.astype(jnp.float32)),
            dw2.at[e].add(g2.astype(jnp.float32)),
        )

    axes = _varying(x, weights, counts, w1, w3, w2, dy)
    zeros = lambda a, dtype=jnp.float32: _zeros(a.shape, dtype, axes)
    dx, dweights, dw1, dw3, dw2 = lax.fori_loop(
        0, total, body, (zeros(x, x.dtype), zeros(weights), zeros(w1), zeros(w3), zeros(w2))
    )
    primals = (x, weights, w1, w3, w2)
    dx, dweights, dw1, dw3, dw2 = (
        _sum_to(g, p).astype(p.dtype) for g, p in zip((dx, dweights, dw1, dw3, dw2), primals)
    )
    return dx, dweights, None, dw1, dw3, dw2


_expert_mlp.defvjp(_expert_mlp_forward, _expert_mlp_backward)


def expert_mlp(x, weights, counts, w1, w3, w2, *, chunks_per_expert: int, tile: int, limit: float):
    """x [G,R,d], weights [G,R] f32, counts [G] int32 -> [G,R,d] float32 (see the module docstring)."""
    rows = x.shape[1]
    y = _expert_mlp(_pad_rows(x, tile), _pad_rows(weights, tile), counts, w1, w3, w2, chunks_per_expert, tile, limit)
    return y[:, :rows]


def tile_flops(tile: int, d: int, inter: int, dtype, limit: float) -> tuple:
    """-> (forward, backward) FLOPs XLA counts for one tile at these sizes: what each executed tile
    adds beyond the single body the cost analysis of a whole program includes per loop."""
    spec = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
    f32 = functools.partial(spec, dt=jnp.float32)
    mask = spec(tile, dt=jnp.bool_)
    counted = lambda f, *a: jax.jit(f).lower(*a).compile().cost_analysis()["flops"]
    forward = lambda *a: _tile_forward(*a, limit)
    backward = lambda *a: _tile_backward(*a, limit)
    return (
        counted(forward, spec(tile, d), f32(tile), mask, spec(d, inter), spec(d, inter), spec(inter, d)),
        counted(
            backward,
            spec(tile, d),
            f32(tile),
            mask,
            f32(tile, inter),
            f32(tile, inter),
            spec(d, inter),
            spec(d, inter),
            spec(inter, d),
            f32(tile, d),
        ),
    )
