"""Human-readable views of a Layout: the axis table and the device grid."""

import math

import numpy as np

from mesh import cost
from mesh.layout import Layout

GRID_MAX_DEVICES = 128  # beyond this a grid no longer fits a terminal; the table still prints


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(value: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return "0" if value == 0 else f"{value / 1e-9:.3g} ns"


def describe_topology(layout: Layout) -> str:
    topology = layout.topology
    lines = [f"topology {topology.name}: {topology.num_devices} devices; {topology.source}"]
    for level in topology.levels:
        latency = _seconds(level.latency) if level.latency else "n/p"
        lines.append(
            f"  level {level.name:<10} x{level.size:<5} {_si(level.bandwidth, 'B/s'):>11}"
            f"  latency {latency:<8} {level.source}"
        )
    if topology.hbm_bytes and topology.peak_flops:
        lines.append(f"  per device: {_si(topology.hbm_bytes, 'B')} HBM, {_si(topology.peak_flops, 'FLOP/s')} BF16")
    return "\n".join(lines)


def axis_table(layout: Layout, nbytes: float) -> str:
    """One row per mesh axis: size, levels crossed, bottleneck, collective times for `nbytes`."""
    header = (
        f"{'axis':<9}{'size':>6}  {'levels crossed (factor)':<34}{'bottleneck':>12}"
        f"{'all-reduce':>12}{'all-gather':>12}{'all-to-all':>12}"
    )
    lines = [f"collective estimates for {_si(nbytes, 'B')} per device (peak bandwidth, lower bound)", header]
    for name in layout.axis_names:
        axis = layout.axis(name)
        crossed = " ".join(f"{level.name}:{factor}" for level, factor in axis.factors) or "-"
        if axis.size == 1:
            lines.append(f"{name:<9}{axis.size:>6}  {crossed:<34}{'-':>12}{'-':>12}{'-':>12}{'-':>12}")
            continue
        times = cost.axis_costs(axis, nbytes)
        lines.append(
            f"{name:<9}{axis.size:>6}  {crossed:<34}{_si(axis.bottleneck_bandwidth, 'B/s'):>12}"
            f"{_seconds(times['all_reduce']):>12}{_seconds(times['all_gather']):>12}"
            f"{_seconds(times['all_to_all']):>12}"
        )
    return "\n".join(lines)


def device_grid(layout: Layout) -> str:
    """Topology ranks by mesh coordinate: one row per coordinate of the outer axes."""
    ids = layout.device_ids
    if ids.size > GRID_MAX_DEVICES:
        return f"(device grid omitted: {ids.size} devices > {GRID_MAX_DEVICES})"
    names = layout.axis_names
    rows = ids.reshape(math.prod(ids.shape[:-1]), ids.shape[-1])
    width = len(str(ids.size - 1))
    lines = [f"rows: ({', '.join(names[:-1])}); columns: {names[-1]}"]
    for row_index, row in enumerate(rows):
        coords = np.unravel_index(row_index, ids.shape[:-1])
        label = ",".join(str(int(c)) for c in coords)
        lines.append(f"  ({label}): " + " ".join(f"{int(rank):>{width}}" for rank in row))
    return "\n".join(lines)
