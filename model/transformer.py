"""DeepSeek-V4: embedding -> hyper-connection streams -> scanned block groups -> hyper-head -> norm -> head,
plus the MTP layers.

Layers of one kind are created stacked (leading `layers` axis) and run under `jax.lax.scan`, one scan
per group of the schedule (`args.layer_groups`), so compile time does not grow with depth.
"""

import dataclasses
import operator
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mesh.sharding import constrain
from model import embedding, params, remat, vocab_head
from model.args import ModelArgs, layer_groups
from model.block import Block
from model.hyper_connections import HyperHead
from model.layouts import STREAMS, TOKENS
from model.moe import MoEStats
from model.mtp import MTPLayer
from model.norms import RMSNorm


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    """What the model gives the objectives: the head's inputs and weight, read over vocabulary tiles
    (`token_logprobs`, `reverse_kl`), and the whole logits only when asked for (inference, parity)."""

    logits: Optional[jax.Array]  # [b, s, vocab] float32, predicts token i+1 (None: not computed)
    mtp_logits: tuple  # per depth k: [b, s, vocab] float32, predicts token i+k+1 (empty: not computed)
    moe: MoEStats  # per layer, MTP layers last: load [L + mtp, E], balance [L + mtp], experts [L + mtp, b, s, k], ...
    head_inputs: Optional[jax.Array] = None  # [1 + mtp, b, s, d] normalised: main head first, then each MTP depth
    head: Optional[jax.Array] = None  # [d, vocab] the shared output head
    hidden: Optional[jax.Array] = None  # [num_layers, b, s, n, d] streams after each layer
    # [num_layers] float32: each layer's KL(attention || indexer) summed over its queries (0 in layers
    # without an indexer), with indexer_loss=True only
    indexer_kl: Optional[jax.Array] = None
    vocab_tile: int = dataclasses.field(default=0, metadata=dict(static=True))  # head columns per tile

    def token_logprobs(self, targets: jax.Array) -> jax.Array:
        """targets [h, b, s] int, for the first h heads (main first, then MTP depths) -> log p(target)
        [h, b, s] float32, through the head one vocabulary tile at a time."""
        return vocab_head.token_logprobs(self.head_inputs[: targets.shape[0]], self.head, targets, self.vocab_tile)

    def reverse_kl(self, teacher: "ModelOutput") -> jax.Array:
        """-> KL(self || teacher) of the main heads over the vocabulary [b, s] float32, tile by tile."""
        return vocab_head.reverse_kl(
            self.head_inputs[0], self.head, teacher.head_inputs[0], teacher.head, self.vocab_tile
        )


def stacked_blocks(args: ModelArgs, kind: tuple, count: int, rngs: nnx.Rngs) -> Block:
    """`count` blocks of one kind with parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(layer_rngs):
        return Block(args, kind, layer_rngs)

    return create(rngs)


def _stack(items, concat=False):
    """Stacks (or concatenates) a list of equal pytrees leaf by leaf."""
    return jax.tree.map(lambda *leaves: (jnp.concatenate if concat else jnp.stack)(leaves), *items)


class LayerGroup(nnx.Module):
    """`repeats` repetitions of a pattern of one or two layer kinds, one stacked Block per position."""

    def __init__(self, args: ModelArgs, pattern: tuple, repeats: int, first_layer: int, rngs: nnx.Rngs):
        self.pattern, self.repeats, self.first_layer = pattern, repeats, first_layer
        self.remat_policy, self.scan_layers = args.remat_policy, args.scan_layers
        self.blocks = nnx.List([stacked_blocks(args, kind, repeats, rngs) for kind in pattern])

    def __call__(
        self, streams, positions, segment_ids, token_ids, collect_hidden: bool, replay=None, indexer_loss: bool = False
    ):
        """replay: [repeats*len(pattern), b, s, k] experts per layer or None ->
        (streams, MoEStats stacked [repeats*len(pattern), ...], indexer KL [repeats*len(pattern)] (Block),
        hidden [repeats*len(pattern), ...] or None), layers in schedule order."""
        graphdef, state = nnx.split(self.blocks)
        period = len(self.pattern)
        if replay is not None:
            replay = replay.reshape(self.repeats, period, *replay.shape[1:])

        full = self.remat_policy == "full"

        def step(carry, xs, context):
            carry = jax.tree.map(lambda x: checkpoint_name(x, remat.LAYER_INPUT), carry)
            layer_state, layer_replay = xs
            blocks = nnx.merge(graphdef, layer_state)
            stats, kls, hidden = [], [], []
            for position, block in enumerate(blocks):
                layer = lambda state, carry, replay, context, graphdef=nnx.graphdef(block): nnx.merge(graphdef, state)(
                    carry, *context, replay, indexer_loss
                )
                if full and period > 1:  # one layer's activations at a time in the step's backward
                    layer = remat.after_cotangent(layer)
                replayed = None if layer_replay is None else layer_replay[position]
                carry, layer_stats, kl = layer(nnx.state(block), carry, replayed, context)
                stats.append(layer_stats)
                kls.append(kl)
                hidden.append(carry)
            return carry, (_stack(stats), jnp.stack(kls), jnp.stack(hidden) if collect_hidden else None)

        # A one-step scan becomes straight-line code, where XLA would run the recomputation early.
        step = remat.under(self.remat_policy, step, looped=self.scan_layers and self.repeats > 1)
        body = lambda carry, xs: step(carry, xs, (positions, segment_ids, token_ids))
        if self.scan_layers:
            streams, (stats, kls, hidden) = jax.lax.scan(body, streams, (state, replay))
        else:
            outputs = []
            for r in range(self.repeats):
                streams, out = body(streams, jax.tree.map(operator.itemgetter(r), (state, replay)))
                outputs.append(out)
            stats, kls, hidden = _stack(outputs)
        merge_layers = lambda a: a.reshape(-1, *a.shape[2:])  # [repeats, pattern, ...] -> schedule order
        hidden = None if hidden is None else merge_layers(hidden)
        return streams, jax.tree.map(merge_layers, stats), merge_layers(kls), hidden


class DeepSeekV4(nnx.Module):
    def __init__(self, args: ModelArgs, rngs: nnx.Rngs):
        self.args = args
        d, v, std, wdt = args.hidden_size, args.vocab_size, args.initializer_range, args.weight_dtype
        self.embed = params.normal(rngs, (v, d), ("vocab", "embed"), std, wdt)
        self.groups = nnx.List(
            [LayerGroup(args, pattern, repeats, first, rngs) for pattern, repeats, first in layer_groups(args)]
        )
        self.hc_head = HyperHead(args, rngs)
        self.norm = RMSNorm(d, "embed", args.rms_norm_eps)
        self.head = params.normal(rngs, (d, v), ("embed", "vocab"), std, wdt)
        self.mtp = nnx.List([MTPLayer(args, rngs) for _ in range(args.num_mtp_layers)])

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return constrain(embedding.lookup(self.embed[...], tokens, self.args.compute_dtype), TOKENS)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Normalised hidden [b,s,d] -> float32 logits [b,s,vocab] through the shared head."""
        out = jnp.einsum("bsd,dv->bsv", hidden, self.head[...].astype(hidden.dtype), preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_length", "act_vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        positions: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        collect_hidden: bool = False,
        routed_experts: Optional[jax.Array] = None,
        logits: bool = True,
        indexer_loss: bool = False,
    ) -> ModelOutput:
        """tokens [b,s] int32. Packed rows give segment_ids (1, 2, ... per document, 0 = padding) and
        positions restarting at 0 in each document; by default a row is one document 0..s-1.
        routed_experts [b, s, num_layers, k] int32 (routing replay) makes every main layer use those
        experts; the MTP layers route themselves (inference engines do not record them).
        logits=False leaves the whole logits out: the objectives read the head tile by tile.
        indexer_loss=True adds each layer's indexer KL (`ModelOutput.indexer_kl`, model.indexer)."""
        b, s = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        x = self.embed_tokens(tokens)
        streams = constrain(jnp.broadcast_to(x[:, :, None, :], (b, s, self.args.hc_mult, x.shape[-1])), STREAMS)
        stats, kls, hidden = [], [], []
        replay = None if routed_experts is None else jnp.moveaxis(routed_experts, 2, 0)  # [L, b, s, k]
        for group in self.groups:
            layers = slice(group.first_layer, group.first_layer + group.repeats * len(group.pattern))
            streams, group_stats, group_kls, group_hidden = group(
                streams,
                positions,
                segment_ids,
                tokens,
                collect_hidden,
                None if replay is None else replay[layers],
                indexer_loss,
            )
            stats.append(group_stats)
            kls.append(group_kls)
            hidden.append(group_hidden)
        head_inputs = [self.norm(self.hc_head(streams))]
        for depth, layer in enumerate(self.mtp, start=1):
            ahead = jnp.pad(tokens[:, depth:], ((0, 0), (0, depth)))  # token i+depth (0 past the end)
            mtp_step = lambda state, streams, next_embeds, context, graphdef=nnx.graphdef(layer): nnx.merge(
                graphdef, state
            )(streams, next_embeds, *context)
            mtp_step = remat.under(self.args.remat_policy, mtp_step)
            streams, mtp_hidden, layer_stats = mtp_step(
                nnx.state(layer), streams, self.embed_tokens(ahead), (positions, segment_ids, tokens)
            )
            head_inputs.append(mtp_hidden)
            stats.append(_stack([layer_stats]))
        whole = [self.logits(h) for h in head_inputs] if logits else [None]
        return ModelOutput(
            logits=whole[0],
            mtp_logits=tuple(whole[1:]),
            moe=_stack(stats, concat=True),
            head_inputs=jnp.stack(head_inputs),
            head=self.head[...],
            hidden=jnp.concatenate(hidden, axis=0) if collect_hidden else None,
            indexer_kl=jnp.concatenate(kls) if indexer_loss else None,
            vocab_tile=self.args.vocab_tile or self.args.vocab_size,
        )

    def update_routing_bias(self, load: jax.Array, rate: float) -> None:
        """Aux-loss-free balancing, after a step: each score-routed layer's selection bias moves by
        rate * sign(mean load - load), raising under-loaded experts. load: [L + mtp, E] (ModelOutput.moe)."""

        def step(bias, layer_load):
            mean = jnp.mean(layer_load, axis=-1, keepdims=True)
            bias[...] = bias[...] + rate * jnp.sign(mean - layer_load)

        for group in self.groups:
            period = len(group.pattern)
            for offset, blocks in enumerate(group.blocks):
                if not blocks.moe.router.hashed:
                    rows = group.first_layer + offset + period * jnp.arange(group.repeats)
                    step(blocks.moe.router.bias, load[rows])
        for depth, layer in enumerate(self.mtp):
            step(layer.block.moe.router.bias, load[self.args.num_layers + depth])
