"""Time estimates for collectives along one mesh axis, from the levels the axis spans.

A collective over an axis with factors s_1..s_k on levels 1..k (innermost first, n = prod s_l)
is modelled the way HCCL runs it, one phase per level (ascend_topology.md 3.1, HCCL_ALGO levels):
- all-gather of a result of B bytes per device goes outer level first, so the slow links carry
  the small pieces: level l moves (s_l - 1) * B / (s_1 * ... * s_l) bytes per device;
- reduce-scatter of B input bytes is the mirror image (inner level first), same bytes;
- all-reduce = reduce-scatter + all-gather;
- all-to-all with B bytes sent per device: a peer first reached at level l gets B / n, and
  (s_l - 1) * s_1 * ... * s_{l-1} peers are reached there; the phases are added, which is exact
  when the levels share a port (UB L1 and L2 do) and an upper bound otherwise.
Ring phases add (s_l - 1) latencies, all-to-all one per level. Bandwidths are peak figures and
unpublished latencies count as zero, so the estimates are lower bounds; the measured UB rates are
0.7-0.85 of peak and MoE all-to-all reaches 54-131 GB/s per rank (ascend_topology.md 2.5).
"""

from mesh.layout import AxisPlacement


def _latency(level) -> float:
    return level.latency or 0.0


def all_gather_seconds(axis: AxisPlacement, nbytes: float) -> float:
    """Gathering a tensor of `nbytes` (the full result on each device) along `axis`."""
    seconds, done = 0.0, 1
    for level, factor in axis.factors:
        done *= factor
        seconds += (factor - 1) * nbytes / done / level.bandwidth + (factor - 1) * _latency(level)
    return seconds


def reduce_scatter_seconds(axis: AxisPlacement, nbytes: float) -> float:
    """Reducing `nbytes` per device and leaving each device its 1/size share."""
    return all_gather_seconds(axis, nbytes)


def all_reduce_seconds(axis: AxisPlacement, nbytes: float) -> float:
    """Reducing a buffer of `nbytes` so every device holds the sum."""
    return reduce_scatter_seconds(axis, nbytes) + all_gather_seconds(axis, nbytes)


def all_to_all_seconds(axis: AxisPlacement, nbytes: float) -> float:
    """Every device sends `nbytes` in total, an equal share to each peer of the axis."""
    seconds, inner = 0.0, 1
    for level, factor in axis.factors:
        peers = (factor - 1) * inner
        seconds += nbytes * peers / axis.size / level.bandwidth + _latency(level)
        inner *= factor
    return seconds


COLLECTIVES = {
    "all_reduce": all_reduce_seconds,
    "all_gather": all_gather_seconds,
    "reduce_scatter": reduce_scatter_seconds,
    "all_to_all": all_to_all_seconds,
}


def axis_costs(axis: AxisPlacement, nbytes: float) -> dict[str, float]:
    """Seconds for each collective of `nbytes` along `axis` (the planner's per-axis view)."""
    return {kind: estimate(axis, nbytes) for kind, estimate in COLLECTIVES.items()}
