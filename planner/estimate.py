"""Step time and MFU from counted FLOPs and parsed collectives on a topology.

Compute time = FLOPs per device / peak FLOP/s of a device. Each collective is costed with
`mesh.cost` along the levels its mesh axes occupy (several axes: their factors merged per level).
CPU HLO distortions are corrected where they are known (jax_cpu_notes.md): a gradient reduction over
the FSDP axes appears as an all-reduce but runs as a reduce-scatter (the update only needs its
shard), so all-reduces spanning `fsdp` are costed as reduce-scatters. Bytes stay as the CPU program
has them (bf16 collectives show as f32 there), so communication is an upper bound on that count, and
a lower bound on link time (peak bandwidths, no latency where none is published). No overlap of
compute and communication is assumed: step_time = compute + communication.
"""

import math

from mesh import cost
from mesh.layout import AxisPlacement, Layout

SECONDS = {
    "all-reduce": cost.all_reduce_seconds,
    "all-gather": cost.all_gather_seconds,
    "reduce-scatter": cost.reduce_scatter_seconds,
    "all-to-all": cost.all_to_all_seconds,
}


def placement(layout: Layout, axes: tuple) -> AxisPlacement:
    """One AxisPlacement for a group of mesh axes: their level factors multiplied per level."""
    levels = list(layout.topology.levels)
    factors = {}
    for name in axes:
        for level, factor in layout.axis(name).factors:
            factors[level.name] = (level, factors.get(level.name, (level, 1))[1] * factor)
    ordered = tuple(factors[level.name] for level in levels if level.name in factors)
    return AxisPlacement("+".join(axes), math.prod(f for _, f in ordered), ordered)


def collective_seconds(kind: str, axes: tuple, nbytes: float, layout: Layout) -> float:
    """Seconds for one collective of `kind` whose result is `nbytes` per device over `axes`."""
    if not axes:
        return 0.0
    where = placement(layout, axes)
    if kind == "collective-permute":
        return nbytes / min(level.bandwidth for level, _ in where.factors)
    if kind == "reduce-scatter":
        nbytes *= where.size  # the HLO result is the scattered shard; the cost model takes the input
    elif kind == "all-reduce" and "fsdp" in axes:
        kind = "reduce-scatter"  # its result is the whole input already: no scaling
    return SECONDS[kind](where, nbytes)


def step_estimate(
    flops_per_device: float, comm_seconds: float, model_flops: float, devices: int, peak_flops: float | None
) -> dict:
    if not peak_flops:
        return {"compute_s": None, "step_time_s": None, "mfu": None}
    compute = flops_per_device / peak_flops
    step = compute + comm_seconds
    return {"compute_s": compute, "step_time_s": step, "mfu": model_flops / (step * peak_flops * devices)}
