"""Figures read from one compiled program: XLA-counted FLOPs and the collectives by kind and mesh axes,
as flat {key: number} dicts that `planner.extrapolate.combine` can add and scale."""

import math

from mesh import hlo_collectives
from mesh.sharding import resolve_spec
from model.args import ModelArgs
from model.expert_dispatch import W13_NAMES, capacity
from model.grouped_mlp import chunk_tile, tile_flops
from model.remat import forward_passes
from planner.memory import tokens_per_device

FLOPS = "flops"
SEP = "|"


def collective_key(kind: str, axes: tuple, what: str) -> str:
    return SEP.join((kind, ",".join(axes), what))


def split_key(key: str) -> tuple:
    kind, axes, what = key.split(SEP)
    return kind, tuple(a for a in axes.split(",") if a), what


def measure(compiled, mesh_shape: dict) -> dict:
    """{"flops": per device, "<kind>|<axes>|count": n, "<kind>|<axes>|bytes": result bytes per device}."""
    figures = {FLOPS: float(compiled.cost_analysis()["flops"])}
    for collective in hlo_collectives.parse(compiled.as_text()):
        axes = collective.axes(mesh_shape)
        if not axes:
            continue
        for what, value in (("count", 1), ("bytes", collective.bytes)):
            key = collective_key(collective.kind, axes, what)
            figures[key] = figures.get(key, 0) + value
    return figures


def chunk_rows(args: ModelArgs, tokens: int) -> int:
    """Rows of one (local expert, source) chunk of the padded dispatch for `tokens` tokens per device."""
    return capacity(tokens, args.num_experts_per_tok, args.num_routed_experts, args.capacity_factor or None)


def tile_body_flops(args: ModelArgs, tokens: int, mesh_shape: dict, rules) -> tuple:
    """(forward, backward) XLA-counted FLOPs of one expert-MLP tile (`chunk_tile` of the chunks of
    `tokens` tokens per device) on this mesh, whose `tensor`-like axes split the expert hidden width I
    the way the routed weights' rules do."""
    shape = (args.num_routed_experts, args.hidden_size, args.moe_intermediate_size)
    spec = resolve_spec("routed w1/w3", W13_NAMES, shape, mesh_shape, rules)[2]
    split = math.prod(mesh_shape[a] for a in ((spec,) if isinstance(spec, str) else spec or ()))
    return tile_flops(
        chunk_tile(chunk_rows(args, tokens), args.expert_tile),
        args.hidden_size,
        args.moe_intermediate_size // split,
        args.compute_dtype,
        args.swiglu_limit,
    )


def uncounted_tile_flops(args: ModelArgs, batch_size: int, seq_len: int, mesh_shape: dict, rules) -> float:
    """FLOPs per device of the tiled expert MLP's tiles beyond the one body per loop XLA counts, for
    every MoE layer, assuming balanced routing (each source sends t*k/E rows to every expert).
    Each layer's forward loop runs as often as `model.remat.forward_passes` says."""
    if args.moe_dispatch != "padded" or not args.expert_tile:
        return 0.0
    experts, k = args.num_routed_experts, args.num_experts_per_tok
    tokens = tokens_per_device(batch_size * seq_len, mesh_shape)
    cap = chunk_rows(args, tokens)
    rows = min(cap, tokens * k / experts)
    tiles = experts * math.ceil(rows / chunk_tile(cap, args.expert_tile))  # chunks per device: E
    forward, backward = tile_body_flops(args, tokens, mesh_shape, rules)
    passes = forward_passes(args)
    return (tiles - 1) * (sum(passes) * forward + len(passes) * backward)
