"""Mixture of experts: sqrt-softplus router (score-routed with a balancing bias, or hash-routed by token
id), clamped-SwiGLU routed experts and a shared expert.

Routed experts run either through the sorted, expert-parallel dispatch of `model.expert_dispatch`
(`moe_dispatch` "padded" or "ragged": tokens sorted by expert and moved by all-to-all over the
experts' mesh axes, `expert` or data x expert) or through the dense reference ("dense": every expert
sees every token and a combine matrix keeps each token's choices; exact, E/k times the useful
FLOPs). tests/test_expert_dispatch.py: the dense reference and the padded dispatch give the same
output and gradients, and the dispatch equals a per-expert loop on each of its meshes.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mesh.sharding import constrain, shard_local
from model import params
from model.activations import clamped_swiglu
from model.args import ModelArgs
from model.expert_dispatch import routed_experts
from model.layouts import TOKENS


@dataclasses.dataclass(frozen=True)
class Routing:
    """Per-token choice: experts [...,k] int32, weights [...,k] f32, scores [...,E] f32 (unbiased);
    tokens as [t] or [b,s], like the router's input."""

    experts: jax.Array
    weights: jax.Array
    scores: jax.Array


class Router(nnx.Module):
    def __init__(self, args: ModelArgs, hashed: bool, rngs: nnx.Rngs):
        self.k, self.scale, self.hashed = args.num_experts_per_tok, args.routed_scaling_factor, hashed
        e = args.num_routed_experts
        self.weight = params.normal(
            rngs, (args.hidden_size, e), ("embed", "expert_gate"), args.initializer_range, args.weight_dtype
        )
        if hashed:
            table = jax.random.randint(rngs.params(), (args.vocab_size, self.k), 0, e, jnp.int32)
            self.tid2eid = params.HashTable(table, out_sharding=("vocab", "topk"), eager_sharding=False)
        else:
            self.bias = params.constant((e,), ("expert_gate",), 0.0, jnp.float32, kind=params.RoutingBias)

    def __call__(self, x: jax.Array, token_ids: jax.Array, replay=None) -> Routing:
        """x [...,d], token_ids [...], replay [...,k] int32 or None -> Routing (tokens [t] or [b,s]). With
        `replay` (routing replay for MoE RL: the experts an inference engine chose) those experts are
        used; their gate weights are still this router's scores, so the router keeps its gradient."""
        logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        scores = jnp.sqrt(jax.nn.softplus(logits))
        if replay is not None:
            experts = replay
        elif self.hashed:
            experts = self.tid2eid[...][token_ids]
        else:
            biased = jax.lax.stop_gradient(scores) + self.bias[...]
            experts = shard_local(
                lambda s: jax.lax.top_k(s, self.k)[1], TOKENS[: x.ndim - 1], biased
            )  # token dims [t] or [b,s]
        chosen = jnp.take_along_axis(scores, experts, axis=-1)
        weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True) * self.scale
        return Routing(experts=experts.astype(jnp.int32), weights=weights, scores=scores)


class SharedExpert(nnx.Module):
    def __init__(self, args: ModelArgs, rngs: nnx.Rngs):
        d, i, std, wdt = args.hidden_size, args.moe_intermediate_size, args.initializer_range, args.weight_dtype
        self.limit = args.swiglu_limit
        self.w1 = params.normal(rngs, (d, i), ("embed", "mlp"), std, wdt)
        self.w3 = params.normal(rngs, (d, i), ("embed", "mlp"), std, wdt)
        self.w2 = params.normal(rngs, (i, d), ("mlp", "embed"), std, wdt)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [...,d] -> [...,d] float32."""
        dt = x.dtype
        gate = jnp.einsum("...d,di->...i", x, self.w1[...].astype(dt), preferred_element_type=jnp.float32)
        up = jnp.einsum("...d,di->...i", x, self.w3[...].astype(dt), preferred_element_type=jnp.float32)
        h = clamped_swiglu(gate, up, self.limit).astype(dt)
        return jnp.einsum("...i,id->...d", h, self.w2[...].astype(dt), preferred_element_type=jnp.float32)


class RoutedExperts(nnx.Module):
    def __init__(self, args: ModelArgs, rngs: nnx.Rngs):
        e, d, i = args.num_routed_experts, args.hidden_size, args.moe_intermediate_size
        std, wdt = args.initializer_range, args.weight_dtype
        self.limit, self.num_experts = args.swiglu_limit, e
        self.dispatch, self.capacity_factor, self.tile = args.moe_dispatch, args.capacity_factor, args.expert_tile
        self.w1 = params.normal(rngs, (e, d, i), ("expert", "expert_embed", "expert_mlp"), std, wdt)
        self.w3 = params.normal(rngs, (e, d, i), ("expert", "expert_embed", "expert_mlp"), std, wdt)
        self.w2 = params.normal(rngs, (e, i, d), ("expert", "expert_mlp", "expert_embed"), std, wdt)

    def __call__(self, x: jax.Array, routing: Routing):
        """x [...,d] -> (y [...,d] float32, assignments dropped by a capacity limit, expert tiles run)."""
        if self.dispatch == "dense":
            return self.dense(x, routing), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        dt = x.dtype
        y, stats = routed_experts(
            x,
            routing,
            self.w1[...].astype(dt),
            self.w3[...].astype(dt),
            self.w2[...].astype(dt),
            limit=self.limit,
            backend=self.dispatch,
            capacity_factor=self.capacity_factor or None,
            tile=self.tile,
        )
        return y, stats["dropped_tokens"], stats["expert_tiles"]

    def dense(self, x: jax.Array, routing: Routing) -> jax.Array:
        """Dense reference dispatch: x [...,d] -> [...,d] float32 (the routing weight scales h before w2)."""
        shape, dt = x.shape, x.dtype
        x = x.reshape(-1, shape[-1])
        experts, weights = (a.reshape(x.shape[0], -1) for a in (routing.experts, routing.weights))
        combine = jnp.zeros((x.shape[0], self.num_experts), jnp.float32)
        combine = combine.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
        gate = jnp.einsum("td,edi->tei", x, self.w1[...].astype(dt), preferred_element_type=jnp.float32)
        up = jnp.einsum("td,edi->tei", x, self.w3[...].astype(dt), preferred_element_type=jnp.float32)
        h = clamped_swiglu(gate, up, self.limit) * combine[..., None]
        h = constrain(h.astype(dt), ("act_batch", "act_expert", "act_mlp"))
        return jnp.einsum("tei,eid->td", h, self.w2[...].astype(dt), preferred_element_type=jnp.float32).reshape(shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEStats:
    """Per layer: load [E] (token-expert assignments per expert), balance (sequence-wise balance loss,
    before its weight), dropped (assignments a capacity limit dropped), tiles (tiles the tiled expert
    MLP ran, over all devices; see model.grouped_mlp), experts [b,s,k] int32 (the experts each token
    used: what a rollout records for routing replay)."""

    load: jax.Array
    balance: jax.Array
    dropped: jax.Array
    tiles: jax.Array
    experts: jax.Array


def sequence_balance_loss(routing: Routing, valid: jax.Array, k: int) -> jax.Array:
    """Mean over the rows holding tokens of sum_i f_i * P_i: f_i = E/(k*T) * tokens choosing expert i,
    P_i = mean of the normalised scores s_i / sum_j s_j over the row's T tokens (valid [b,s]: the
    tokens, padding excluded). Equals 1 when perfectly balanced."""
    e = routing.scores.shape[-1]
    rows = valid.shape[0]
    mask = valid.reshape(rows, -1, 1).astype(jnp.float32)  # [b, s, 1]
    tokens = jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [b, 1]
    probs = (routing.scores / jnp.sum(routing.scores, axis=-1, keepdims=True)).reshape(rows, -1, e)
    chosen = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32).sum(axis=-2).reshape(rows, -1, e)
    fraction = jax.lax.stop_gradient(jnp.sum(chosen * mask, axis=1) / tokens) * (e / k)
    per_row = jnp.sum(fraction * jnp.sum(probs * mask, axis=1) / tokens, axis=-1)
    holding = jnp.any(valid.reshape(rows, -1), axis=1).astype(jnp.float32)
    return jnp.sum(per_row * holding) / jnp.maximum(jnp.sum(holding), 1.0)


class MoE(nnx.Module):
    def __init__(self, args: ModelArgs, hashed: bool, rngs: nnx.Rngs):
        self.router = Router(args, hashed, rngs)
        self.experts = RoutedExperts(args, rngs)
        self.shared = SharedExpert(args, rngs) if args.num_shared_experts else None

    def __call__(self, u: jax.Array, token_ids: jax.Array, valid: jax.Array, replay=None):
        """u [b,s,d], token_ids [b,s], valid [b,s] bool (False: padding), replay [b,s,k] or None ->
        (output [b,s,d], MoEStats). Padding is not routed: it takes no expert capacity, and counts in
        neither the load (which drives the bias update) nor the balance loss; its routed output is zero.
        Rows are the balance loss's sequences (hash-routed layers choose by token id, so their balance
        term is zero)."""
        routing = self.router(u, token_ids, replay)
        e = self.experts.num_experts
        dispatched = dataclasses.replace(
            routing,
            experts=jnp.where(valid[..., None], routing.experts, e),
            weights=jnp.where(valid[..., None], routing.weights, 0.0),
        )
        y, dropped, tiles = self.experts(u, dispatched)
        if self.shared is not None:
            y = y + self.shared(u)
        counted = jnp.broadcast_to(valid[..., None], routing.experts.shape).astype(jnp.float32)
        load = jnp.zeros((e,), jnp.float32).at[routing.experts.reshape(-1)].add(counted.reshape(-1))
        balance = (
            jnp.zeros((), jnp.float32) if self.router.hashed else sequence_balance_loss(routing, valid, self.router.k)
        )
        stats = MoEStats(load=load, balance=balance, dropped=dropped, tiles=tiles, experts=routing.experts)
        return y.astype(u.dtype), stats
