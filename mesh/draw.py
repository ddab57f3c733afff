"""A picture of a mesh laid on a topology: which levels each axis crosses and which devices it spans.

`layout_figure(layout)` draws two panels for a mesh.layout.Layout. The top one is a table of mesh
axes (rows) by topology levels (columns, innermost left, with their fan-out and bandwidth per
device): a cell holds the factor of the axis on that level, so its coloured cells are the links its
collectives cross. The bottom one lays the device ranks out in topology order (dies of a chip next
to each other, then chips, servers, ...) with the group boundaries of the levels, and colours per axis
the peers of device 0 along that axis by their coordinate: the dies one of its collectives spans.
Only axes larger than 1 are drawn. `python -m mesh --draw=out.png` saves it; a matplotlib `Figure` on
the Agg canvas, no display.
"""

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from mesh.layout import Layout

MAX_BOUNDARIES = 64  # a level's group boundaries are drawn while there are at most this many


def drawn_axes(layout: Layout) -> list[str]:
    """The axes worth drawing: those larger than 1 (all of them on a single device)."""
    return [name for name in layout.axis_names if layout.shape[name] > 1] or list(layout.axis_names)


def level_factors(layout: Layout, axes: list[str]) -> np.ndarray:
    """[axes, levels] int: each axis's factor on each level (1 where it does not cross it)."""
    levels = layout.topology.level_names
    factors = np.ones((len(axes), len(levels)), np.int64)
    for row, name in enumerate(axes):
        for level, factor in layout.axis(name).factors:
            factors[row, levels.index(level.name)] = factor
    return factors


def peers_of_device_zero(layout: Layout, name: str) -> np.ndarray:
    """The ranks of the devices that share all mesh coordinates but `name`'s with device 0 (its peers
    in a collective over that axis), in the order of their coordinate along `name`."""
    along = layout.axis_names.index(name)
    return layout.device_ids[tuple(slice(None) if i == along else 0 for i in range(layout.device_ids.ndim))]


def _level_table(panel, layout: Layout, axes: list[str]) -> None:
    factors = level_factors(layout, axes)
    crossed = np.ma.masked_equal(np.log2(factors.astype(float)), 0.0)
    # The largest factor at 1/1.4 of the colour scale: mid-blue, so its black label stays legible.
    panel.imshow(
        crossed,
        cmap="Blues",
        aspect="auto",
        interpolation="nearest",
        vmin=0.0,
        vmax=max(float(np.log2(factors.max())), 1.0) * 1.4,
    )
    for (row, column), factor in np.ndenumerate(factors):
        if factor > 1:
            panel.text(column, row, f"x{factor}", ha="center", va="center", fontsize=11)
    levels = layout.topology.levels
    panel.set_xticks(
        range(len(levels)), [f"{level.name}\nx{level.size}, {level.bandwidth / 1e9:.3g} GB/s" for level in levels]
    )
    panel.set_yticks(range(len(axes)), [f"{name}={layout.shape[name]}" for name in axes])
    panel.set_title("levels each mesh axis crosses (its factor there), innermost level left")


def _device_strip(panel, layout: Layout, axes: list[str]) -> None:
    devices, group = layout.topology.num_devices, 1
    width = max(1.0, devices / 400)  # a peer stays visible however many devices there are
    for row, name in enumerate(axes):
        ranks = peers_of_device_zero(layout, name)
        colours = colormaps["viridis"](np.linspace(0.0, 1.0, ranks.size))
        panel.bar(ranks, 0.8, width=width, bottom=row - 0.4, color=colours, align="edge")
    for depth, level in enumerate(layout.topology.levels[:-1]):
        group *= level.size
        if devices // group <= MAX_BOUNDARIES:
            for boundary in range(group, devices, group):
                panel.axvline(boundary, color="0.6", linewidth=0.5 + depth, zorder=0)
    panel.set_xlim(0, devices)
    panel.set_ylim(len(axes) - 0.5, -0.5)
    panel.set_yticks(range(len(axes)), axes)
    panel.set_xlabel(
        f"device rank ({', '.join(layout.topology.level_names)} groups, innermost first; lines: group boundaries)"
    )
    panel.set_title("devices of device 0's collective along each axis, coloured by their coordinate")


def layout_figure(layout: Layout) -> Figure:
    """The two panels described in the module docstring, for `layout`."""
    axes = drawn_axes(layout)
    height = 2.0 + 0.5 * len(axes)
    figure = Figure(figsize=(12, 2 * height), dpi=100, layout="constrained")
    table, strip = figure.subplots(2, 1)
    _level_table(table, layout, axes)
    _device_strip(strip, layout, axes)
    mesh = ", ".join(f"{name}={layout.shape[name]}" for name in axes)
    figure.suptitle(f"mesh {mesh} on {layout.topology.name} ({layout.topology.num_devices} devices)")
    return figure
