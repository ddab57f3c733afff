"""Exact FLOPs and collective bytes of a deep model from a few shallow, unrolled compiles.

XLA's cost analysis counts a loop body once, and the collectives of a scanned layer appear once in
the HLO, so the scanned full-depth program undercounts both. Unrolled programs count everything but
take long to compile at full depth. Every layer of a group has the same structure and sharding, so a
figure F is linear in the groups' repeat counts r_g:  F(r) = F(1,...,1) + sum_g (r_g - 1) * d_g, with
d_g = F(1,..,2 at g,..,1) - F(1,...,1). One compile with every group once, plus one per group that
repeats, gives F at full depth exactly.
"""

import dataclasses

from model.args import ModelArgs, layer_groups


def with_repeats(args: ModelArgs, repeats: tuple) -> ModelArgs:
    """`args` with group g of `layer_groups(args)` repeated repeats[g] times, layers unrolled (so how
    the variant itself would group its layers does not matter: its cost is a sum over layers)."""
    groups = layer_groups(args)
    kinds = [kind for (pattern, _, _), count in zip(groups, repeats) for _ in range(count) for kind in pattern]
    hashed = [routing == "hash" for _, routing in kinds]
    if hashed != sorted(hashed, reverse=True):
        raise ValueError("hash-routed layers must come first in every variant")
    mtp = slice(args.num_layers, None)
    ratio = args.kind_ratios()
    named = None if args.attention_kinds is None else tuple(a for a, _ in kinds) + args.attention_kinds[mtp]
    return dataclasses.replace(
        args,
        num_layers=len(kinds),
        num_hash_layers=sum(hashed),
        scan_layers=False,
        compress_ratios=tuple(ratio[a] for a, _ in kinds) + args.compress_ratios[mtp],
        attention_kinds=named,
    )


def variants(args: ModelArgs) -> list:
    """[(name, repeats)] to measure: the base (every group once) and one per repeating group."""
    groups = layer_groups(args)
    base = tuple(1 for _ in groups)
    plan = [("base", base)]
    for index, (pattern, repeats, first) in enumerate(groups):
        if repeats > 1:
            plan.append((f"group{index}", tuple(2 if i == index else 1 for i in range(len(groups)))))
    return plan


def combine(args: ModelArgs, measured: dict) -> dict:
    """Full-depth figures from {name: {key: number}} measured on `variants(args)`; keys missing in a
    variant count as 0."""
    groups = layer_groups(args)
    base = measured["base"]
    keys = set().union(*(m.keys() for m in measured.values()))
    total = {key: float(base.get(key, 0.0)) for key in keys}
    for index, (_, repeats, _) in enumerate(groups):
        if repeats > 1:
            one_more = measured[f"group{index}"]
            for key in keys:
                total[key] += (repeats - 1) * (one_more.get(key, 0.0) - base.get(key, 0.0))
    return total
