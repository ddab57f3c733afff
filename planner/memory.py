"""Per-device memory of a compiled step, and an analytic breakdown to read it against.

The compiled figure is XLA's own: arguments + outputs - aliased (donated) + temporaries. On CPU,
`peak_memory_in_bytes` leaves the temporaries out, so it is not used.
The breakdown: weights, gradients and optimizer state are exact (their shard shapes); activations are
an estimate: the layer inputs kept for the backward pass plus the largest working set of one layer
(MoE dispatch buffers, attention scores or the vocabulary logits), whichever is largest.
"""
import math

import jax
import numpy as np

from model.args import ModelArgs
from model.expert_dispatch import capacity


def compiled_bytes(compiled) -> dict:
    stats = compiled.memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
             + stats.temp_size_in_bytes)
    return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes, "total": total}


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def analytic_bytes(args: ModelArgs, state, batch_size: int, seq_len: int, mesh_shape: dict) -> dict:
    """Breakdown per device for the abstract TrainState `state` and a [batch_size, seq_len] batch."""
    weights = shard_bytes(state.params) + shard_bytes(state.routing)
    gradients = shard_bytes(state.params)
    optimizer = shard_bytes(state.opt_state)
    token_shards = math.prod(mesh_shape.get(axis, 1) for axis in ("data", "fsdp", "expert"))
    tensor = mesh_shape.get("tensor", 1)
    tokens = batch_size * seq_len // token_shards
    rows = max(batch_size // token_shards, 1)
    act = np.dtype(args.compute_dtype).itemsize
    layers = args.num_layers + args.num_mtp_layers
    kept = layers * tokens * args.hc_mult * args.hidden_size * act
    if args.remat_policy == "none":
        kept *= 8  # every intermediate of a layer stays; a rough multiple of its input streams
    experts = args.num_routed_experts
    cap = capacity(tokens, args.num_experts_per_tok, experts, args.capacity_factor or None)
    moe = experts * cap * args.hidden_size * (act + 4) * 2            # rows out (x.dtype) and back (f32), both ways
    entries = seq_len // min(r for r in args.compress_ratios if r) if any(args.compress_ratios) else 0
    span = args.sliding_window + args.window_block + entries + 1
    attention = rows * max(args.num_heads // tensor, 1) * seq_len * span * 4 * 2   # f32 logits and probs
    logits = tokens * args.vocab_size // tensor * 4 * 2
    activations = kept + max(moe, attention, logits)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations,
            "total": weights + gradients + optimizer + activations}
