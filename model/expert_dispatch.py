"""Expert-parallel dispatch of the routed experts: sort where the tokens are, all-to-all over the
mesh axes of the experts' `expert` dim (`expert`, or data x expert with
`configs.parallelism.rules(experts_over_data=True)`), grouped matmul over the local experts,
all-to-all back, combine.

`model.moe.RoutedExperts.dense` (the dense reference) runs every expert on every token, so it
costs E/k times the useful FLOPs. Here each device sorts its own (token, expert) assignments by
expert, ships each one to the rank that holds the expert, and the expert only sees what was routed to
it. Same maths as the reference: h = clamped_swiglu(x @ w1, x @ w3) is scaled by the routing weight
before w2, matmuls run in x.dtype with float32 accumulation, and the k expert outputs of a token are
summed in float32.

Layout under a mesh (full-manual `jax.shard_map` over every mesh axis, specs from the active rules):
- tokens x/experts/weights: P(act_batch axes, None), i.e. split over (data, fsdp, expert), replicated
  over tensor. Each device dispatches only its own tokens, so the sort never crosses devices; tensor
  ranks holding the same tokens repeat the (cheap) sort and exchange inside their expert group.
  Tokens given as [b, s, ...] are laid out as the model's token-wise activations (`SEQUENCE_NAMES`):
  under sequence parallelism each tensor rank brings a share of every sequence, all-gathered over
  tensor on entry, and the output is reduce-scattered back onto the shares (psum_scatter, whose
  transpose is the all-gather): the bytes of the one psum, without replicating the router or the
  shared expert around it.
- w1/w3 [E,d,I], w2 [E,I,d]: their parameter specs (E over expert, d over fsdp, I over tensor). Inside,
  d is all-gathered over fsdp (the usual ZeRO-3 gather; its transpose is the gradient reduce-scatter,
  a real reduce-scatter even on XLA:CPU, whose partitioner would emit an all-reduce) and I stays split: each tensor rank computes a partial output over its I slice, summed by one psum
  (or psum_scatter, above) over tensor of y [t_local, d] at the end (Megatron-style MLP). Gradients of weights that are
  replicated over data are psum-ed over data by shard_map's transpose.
Full-manual rather than partial-manual (`axis_names={"expert"}`): with data/fsdp left to the SPMD
partitioner the token sort would run on a dimension the partitioner sees as sharded over data/fsdp,
and it may gather it; full-manual keeps every collective explicit and visible.

Capacity (rows per expert in the buffer each device sends, `C`): a token's duplicate choices of one
expert (possible with hash routing) are merged first (weights summed, as the reference's combine
matrix does), so a device sends at most t_local assignments to one expert.
- Dropless (capacity_factor None or 0): C = t_local. Worst-case padded buffers per device:
  E * t_local rows of d in x.dtype out (+ E * t_local float32 routing weights), the same coming back
  in float32, and [E/ep, ep*t_local, I/tp] float32 gate/up/h on the expert side: the grouped einsum
  then costs E*t_local*d*I per device, E/k times the useful work, like the dense reference. With a
  `tile` (ModelArgs.expert_tile) the expert MLP instead runs only the tiles holding received rows
  (`model.grouped_mlp`; tiles shortened to cover a chunk of C rows evenly, `chunk_tile`): the work
  is the routed rows rounded up to whole tiles per (expert, source) chunk, while the buffers' memory
  stays the worst case. Without tiles this is the
  price of static shapes without ragged collectives; the "ragged" backend moves only the t_local*k real
  rows and ragged_dot computes only those where the platform has a grouped kernel (XLA:CPU lowers it
  to a masked dense dot, E_local times the work). Its receive buffer is still ep*t_local*k rows, the
  worst case of every source sending everything to one rank.
  Example, V4-Flash E=256, d=4096, bf16, t_local=4096: the padded send buffer is
  256*4096*4096*2 B = 8 GiB per device, so use capacity_factor (or ragged) at that scale.
- capacity_factor = cf: C = min(t_local, ceil(cf * t_local * k / E)). Per expert, each device keeps
  its first C assignments in (token index, choice slot) order (stable sort) and drops the rest; dropped
  assignments contribute zero and are counted in `dropped_tokens`. Without a mesh t_local is the whole
  batch, so an expert keeps at most ceil(cf * t * k / E).
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from mesh import axes
from mesh.axes import mesh_axes_of
from mesh.sharding import active, resolve_spec
from model.activations import clamped_swiglu
from model.grouped_mlp import chunk_tile, expert_mlp, occupied_tiles
from model.layouts import TOKENS

BACKENDS = ("padded", "ragged")
TOKEN_NAMES = ("act_batch", "act_embed")
SEQUENCE_NAMES = TOKENS  # tokens as [b, s, d], laid out as the model's token-wise activations
W13_NAMES = ("expert", "expert_embed", "expert_mlp")  # w1, w3 [E, d, I]
W2_NAMES = ("expert", "expert_mlp", "expert_embed")  # w2 [E, I, d]
# Platforms whose XLA backend implements the ragged-all-to-all HLO (XLA:CPU does not).
RAGGED_ALL_TO_ALL_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def ragged_all_to_all_supported(platform: str) -> bool:
    """Whether `lax.ragged_all_to_all` compiles on `platform` (a jax Device.platform)."""
    return platform in RAGGED_ALL_TO_ALL_PLATFORMS


def capacity(tokens: int, k: int, num_experts: int, capacity_factor) -> int:
    """Buffer rows per expert for `tokens` local tokens (see the module docstring)."""
    if not capacity_factor:
        return tokens
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * k / num_experts)))


def _merge_duplicates(experts, weights, num_experts):
    """experts/weights [t,k] -> same, with a token's repeated choice of one expert folded into its first
    slot (weights summed) and the repeats given the out-of-range expert id E, so they sort last."""
    same = experts[:, :, None] == experts[:, None, :]  # [t,k,k]
    earlier = jnp.tril(jnp.ones(same.shape[1:], bool), k=-1)  # [k,k]: j < i
    repeat = jnp.any(same & earlier, axis=-1)  # [t,k]
    merged = jnp.einsum("tij,tj->ti", same.astype(weights.dtype), weights)
    return jnp.where(repeat, num_experts, experts), jnp.where(repeat, 0.0, merged)


def _sort(experts, weights, num_experts, cap):
    """Sort a shard's assignments by expert; keep each expert's first `cap`.

    -> order [a] (assignment indices, sorted by expert, kept ones first), counts [E] (distinct
    assignments per expert, before capacity), kept [E] (min(counts, cap)), flat weights [a]."""
    experts, weights = _merge_duplicates(experts, weights, num_experts)
    flat_e, flat_w = experts.reshape(-1), weights.reshape(-1)  # [a = t*k]
    counts = jnp.zeros((num_experts + 1,), jnp.int32).at[flat_e].add(1)[:num_experts]
    order = jnp.argsort(flat_e, stable=True)
    sorted_e = flat_e[order]
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(flat_e.size) - starts[jnp.minimum(sorted_e, num_experts - 1)]
    keep = (sorted_e < num_experts) & (rank < cap)
    # Re-sort so that dropped assignments move behind every kept one (stable: order kept inside groups).
    order = order[jnp.argsort(jnp.where(keep, sorted_e, num_experts), stable=True)]
    return order, counts, jnp.minimum(counts, cap), flat_w


def _ffn_dense_groups(xg, wg, w1, w3, w2, limit):
    """Grouped expert MLP on padded groups: xg [g,c,d], wg [g,c] f32 -> [g,c,d] float32."""
    dt = xg.dtype
    gate = jnp.einsum("gcd,gdi->gci", xg, w1.astype(dt), preferred_element_type=jnp.float32)
    up = jnp.einsum("gcd,gdi->gci", xg, w3.astype(dt), preferred_element_type=jnp.float32)
    h = (clamped_swiglu(gate, up, limit) * wg[..., None]).astype(dt)
    return jnp.einsum("gci,gid->gcd", h, w2.astype(dt), preferred_element_type=jnp.float32)


def _ffn_ragged(xs, ws, group_sizes, w1, w3, w2, limit):
    """Grouped expert MLP on rows sorted by group: xs [n,d], ws [n] f32, group_sizes [g] -> [n,d] f32.
    Rows past sum(group_sizes) come out zero."""
    dt = xs.dtype
    gate = lax.ragged_dot(xs, w1.astype(dt), group_sizes, preferred_element_type=jnp.float32)
    up = lax.ragged_dot(xs, w3.astype(dt), group_sizes, preferred_element_type=jnp.float32)
    h = (clamped_swiglu(gate, up, limit) * ws[:, None]).astype(dt)
    return lax.ragged_dot(h, w2.astype(dt), group_sizes, preferred_element_type=jnp.float32)


def _padded(x, order, kept, flat_w, k, w1, w3, w2, limit, cap, expert_axes, ep, tile):
    """Fixed-size [E, C] per-expert buffers, plain all_to_all over the expert axes -> (y [t,d] f32,
    expert tiles run: 0 when tile is 0 and the whole buffers are multiplied)."""
    t, d = x.shape
    num_experts = kept.shape[0]
    starts = jnp.cumsum(kept) - kept
    slot = jnp.arange(cap)
    valid = slot[None, :] < kept[:, None]  # [E,C]
    assignment = order[jnp.where(valid, starts[:, None] + slot[None, :], 0)]  # [E,C]
    token = assignment // k
    xg = jnp.where(valid[..., None], x[token], 0).astype(x.dtype)  # [E,C,d]
    wg = jnp.where(valid, flat_w[assignment], 0.0)  # [E,C]
    local = num_experts // ep
    received = kept  # [El*ep] rows per chunk
    if ep > 1:
        # [ep(dest), El, C, d] -> [ep(source), El, C, d] -> [El, ep*C, d]
        xg = lax.all_to_all(xg.reshape(ep, local, cap, d), expert_axes, 0, 0)
        wg = lax.all_to_all(wg.reshape(ep, local, cap), expert_axes, 0, 0)
        received = lax.all_to_all(kept.reshape(ep, local), expert_axes, 0, 0).T.reshape(-1)
        xg = xg.transpose(1, 0, 2, 3).reshape(local, ep * cap, d)
        wg = wg.transpose(1, 0, 2).reshape(local, ep * cap)
    if tile:
        # Chunks (local expert, source) of C rows: [El*ep, C, ...].
        tile = chunk_tile(cap, tile)
        out = expert_mlp(
            xg.reshape(local * ep, cap, d),
            wg.reshape(local * ep, cap),
            received,
            w1,
            w3,
            w2,
            chunks_per_expert=ep,
            tile=tile,
            limit=limit,
        ).reshape(local, ep * cap, d)
        tiles = occupied_tiles(received, tile)
    else:
        out = _ffn_dense_groups(xg, wg, w1, w3, w2, limit)  # [El, ep*C, d] f32
        tiles = jnp.zeros((), jnp.int32)
    if ep > 1:
        out = out.reshape(local, ep, cap, d).transpose(1, 0, 2, 3)
        out = lax.all_to_all(out, expert_axes, 0, 0).reshape(num_experts, cap, d)
    return jnp.zeros((t, d), jnp.float32).at[jnp.where(valid, token, t)].add(out, mode="drop"), tiles


def _ragged(x, order, kept, flat_w, k, w1, w3, w2, limit, expert_axes, ep):
    """Only real rows move and are computed: ragged_all_to_all with one slice per expert, ragged_dot.

    The receive buffer is laid out grouped by local expert, sources in order inside a group, so
    ragged_dot runs on it directly; the return trip sends each (expert, source) slice back to where it
    came from in the source's sorted array."""
    t, d = x.shape
    a = order.shape[0]
    num_experts = kept.shape[0]
    xs = x[order // k]  # [a,d] sorted by expert
    ws = jnp.where(jnp.arange(a) < jnp.sum(kept), flat_w[order], 0.0)  # [a]
    starts = jnp.cumsum(kept) - kept  # [E] in my sorted array
    if ep == 1:
        ys = _ffn_ragged(xs, ws, kept, w1, w3, w2, limit)
    else:
        local = num_experts // ep
        me = lax.axis_index(expert_axes)
        counts = lax.all_gather(kept, expert_axes)  # [ep(source), E]
        before = jnp.cumsum(counts, axis=0) - counts  # rows of earlier sources
        totals = counts.sum(0).reshape(ep, local)  # [ep(dest), El]
        group_start = (jnp.cumsum(totals, axis=1) - totals).reshape(num_experts)
        source_starts = jnp.cumsum(counts, axis=1) - counts  # [ep(source), E]

        def own(m):
            """[ep(source), E] -> [ep(source), El]: the columns of my experts."""
            return lax.dynamic_slice_in_dim(m, me * local, local, axis=1)

        recv = own(counts).reshape(-1)  # slice s*El+g
        rows = ep * a  # every source, all to me
        xr = lax.ragged_all_to_all(
            xs, jnp.zeros((rows, d), x.dtype), starts, kept, group_start + before[me], recv, axis_name=expert_axes
        )
        wr = lax.ragged_all_to_all(
            ws, jnp.zeros((rows,), ws.dtype), starts, kept, group_start + before[me], recv, axis_name=expert_axes
        )
        my_groups = lax.dynamic_slice_in_dim(group_start, me * local, local)  # [El]
        out = _ffn_ragged(xr, wr, own(counts).sum(0), w1, w3, w2, limit)  # [ep*a, d] f32
        back_offsets = (my_groups[None, :] + own(before)).reshape(-1)  # [ep*El]
        ys = lax.ragged_all_to_all(
            out,
            jnp.zeros((a, d), jnp.float32),
            back_offsets,
            recv,
            own(source_starts).reshape(-1),
            kept,
            axis_name=expert_axes,
        )
    return jnp.zeros((t, d), jnp.float32).at[order // k].add(ys)


def _shard(
    x,
    experts,
    weights,
    w1,
    w3,
    w2,
    *,
    limit,
    backend,
    capacity_factor,
    tile,
    expert_axes,
    ep,
    gather_axes,
    tensor_axes,
    token_axes,
):
    """One device's dispatch (or the whole batch without a mesh) -> (y [t,d] f32, partial over
    tensor_axes, stats)."""
    t, k = experts.shape
    num_experts = w1.shape[0] * ep
    cap = capacity(t, k, num_experts, capacity_factor)
    order, counts, kept, flat_w = _sort(experts, weights, num_experts, cap)
    if gather_axes:
        w1 = lax.all_gather(w1, gather_axes, axis=1, tiled=True)  # [El, d, I/tp]
        w3 = lax.all_gather(w3, gather_axes, axis=1, tiled=True)
        w2 = lax.all_gather(w2, gather_axes, axis=2, tiled=True)  # [El, I/tp, d]
    if backend == "padded":
        y, tiles = _padded(x, order, kept, flat_w, k, w1, w3, w2, limit, cap, expert_axes, ep, tile)
    else:
        y, tiles = _ragged(x, order, kept, flat_w, k, w1, w3, w2, limit, expert_axes, ep), jnp.zeros((), jnp.int32)
    load, dropped = counts, jnp.sum(counts - kept)
    if token_axes:
        load, dropped, tiles = (lax.psum(v, token_axes) for v in (load, dropped, tiles))
    tiles = tiles * math.prod(lax.axis_size(axis) for axis in tensor_axes)  # every tensor rank runs them
    stats = {
        "dropped_tokens": dropped.astype(jnp.float32),
        "max_load": jnp.max(load).astype(jnp.float32),
        "mean_load": jnp.mean(load.astype(jnp.float32)),
        "expert_tiles": tiles.astype(jnp.float32),
    }
    return y, stats


def _sequence_shard(x, experts, weights, w1, w3, w2, *, stream_axes, tensor_axes, **settings):
    """One device's tokens [..., d] (with stream_axes, [b, s/stream, d]: its share of each sequence)
    -> (y [..., d] f32, stats): the dispatch of the gathered tokens, reduced over tensor."""
    if stream_axes:
        x, experts, weights = (lax.all_gather(a, stream_axes, axis=1, tiled=True) for a in (x, experts, weights))
    flat = lambda a: a.reshape(-1, a.shape[-1])
    y, stats = _shard(flat(x), flat(experts), flat(weights), w1, w3, w2, tensor_axes=tensor_axes, **settings)
    y = y.reshape(x.shape)
    if stream_axes:
        # Every stream rank dispatched the same gathered tokens, so the statistics agree; pmax says so
        # to shard_map (they leave replicated).
        stats = {name: lax.pmax(value, stream_axes) for name, value in stats.items()}
    if stream_axes and stream_axes == tensor_axes:
        return lax.psum_scatter(y, tensor_axes, scatter_dimension=1, tiled=True), stats
    if tensor_axes:
        y = lax.psum(y, tensor_axes)
    if stream_axes:
        share = y.shape[1] // math.prod(lax.axis_size(axis) for axis in stream_axes)
        y = lax.dynamic_slice_in_dim(y, lax.axis_index(stream_axes) * share, share, axis=1)
    return y, stats


def routed_experts(x, routing, w1, w3, w2, *, limit, backend="padded", capacity_factor=None, tile=0):
    """Routed experts by sorted dispatch: x [t,d] or [b,s,d], routing (experts [...,k], weights
    [...,k]), w1/w3 [E,d,I], w2 [E,I,d] -> (y [...,d] float32, stats).

    stats (float32 scalars, over the global batch): dropped_tokens = distinct (token, expert)
    assignments dropped by the capacity limit, max_load / mean_load = assignments per expert,
    expert_tiles = tiles of the padded backend's tiled expert MLP run on all devices (0 otherwise).
    capacity_factor None (or 0) = dropless. tile > 0 (padded backend): the expert MLP runs only on the
    occupied `tile`-row tiles of the buffers (`model.grouped_mlp`); 0 multiplies whole buffers. Inside `mesh.sharding.activate(mesh, rules)` it runs under
    shard_map with all-to-all over the `expert` axis (when larger than 1); otherwise locally.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} not in {BACKENDS}")
    settings = dict(limit=limit, backend=backend, capacity_factor=capacity_factor, tile=tile)
    current = active()
    if current is None:
        return _sequence_shard(
            x,
            routing.experts,
            routing.weights,
            w1,
            w3,
            w2,
            expert_axes=(),
            ep=1,
            gather_axes=(),
            tensor_axes=(),
            token_axes=(),
            stream_axes=(),
            **settings,
        )
    mesh, rules = current
    sizes = dict(mesh.shape)
    names = SEQUENCE_NAMES if x.ndim == 3 else TOKEN_NAMES
    token_spec = resolve_spec("moe tokens", names[:-1], x.shape[:-1], sizes, rules, indivisible_falls_back=True)
    token_spec = PartitionSpec(*(tuple(token_spec) + (None,) * (x.ndim - len(token_spec))))
    batch_axes = mesh_axes_of(token_spec[0])
    stream_axes = mesh_axes_of(token_spec[1]) if x.ndim == 3 else ()
    w13_spec = resolve_spec("routed w1/w3", W13_NAMES, w1.shape, sizes, rules)
    w2_spec = resolve_spec("routed w2", W2_NAMES, w2.shape, sizes, rules)
    if w2_spec != PartitionSpec(w13_spec[0], w13_spec[2], w13_spec[1]):
        raise ValueError(f"routed w2 spec {w2_spec} is not w1's {w13_spec} with d and I swapped")
    expert_axes = mesh_axes_of(w13_spec[0])
    ep = math.prod(sizes[axis] for axis in expert_axes)
    platform = mesh.devices.flat[0].platform
    if backend == "ragged" and ep > 1 and not ragged_all_to_all_supported(platform):
        raise NotImplementedError(
            f"backend='ragged' needs lax.ragged_all_to_all over the {axes.EXPERT!r} axis, which "
            f"XLA on {platform!r} does not implement (HLO ragged-all-to-all is UNIMPLEMENTED); "
            f"use backend='padded'"
        )
    body = jax.shard_map(
        lambda *args: _sequence_shard(
            *args,
            expert_axes=expert_axes,
            ep=ep,
            gather_axes=tuple(a for a in mesh_axes_of(w13_spec[1]) if sizes[a] > 1),
            tensor_axes=mesh_axes_of(w13_spec[2]),
            token_axes=batch_axes,
            stream_axes=stream_axes,
            **settings,
        ),
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, w13_spec, w13_spec, w2_spec),
        out_specs=(token_spec, PartitionSpec()),
    )
    return body(x, routing.experts, routing.weights, w1, w3, w2)
