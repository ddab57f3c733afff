"""The planner's per-device memory as a picture: stacked bars against the HBM line.

`memory_figure(report)` reads planner/report.py's report: the analytic bar stacks weights, gradients,
optimizer state and activations (`memory_analytic`); the compiled bar, when the step was compiled,
stacks XLA's arguments, outputs not aliased to them, and temporaries (`memory_compiled`, which add up
to its total). A dashed line marks the HBM per device (`hbm_bytes`) when the topology has a figure.
Each segment is labelled with its GiB. plan.py's `--memory_png=PATH` saves it as a PNG; a matplotlib
`Figure` on the Agg canvas, no display.
"""

from matplotlib.figure import Figure

from planner.report import GIB

ANALYTIC = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer state"),
    ("activations", "activations (estimate)"),
)
DPI = 100


def memory_bars(report: dict) -> dict[str, list[tuple[str, float]]]:
    """{bar: [(segment, GiB), ...]} of `report`, bottom segment first."""
    analytic = report["memory_analytic"]
    bars = {"analytic": [(label, analytic[key] / GIB) for key, label in ANALYTIC]}
    compiled = report.get("memory_compiled")
    if compiled:
        bars["compiled"] = [
            ("arguments (weights, optimizer state, batch)", compiled["arguments"] / GIB),
            ("outputs not aliased", (compiled["outputs"] - compiled["aliased"]) / GIB),
            ("temporaries (gradients, activations)", compiled["temporaries"] / GIB),
        ]
    return bars


def memory_figure(report: dict) -> Figure:
    """Stacked bars of `memory_bars(report)` with the HBM line; the title names topology and mesh."""
    figure = Figure(figsize=(10, 6), dpi=DPI, layout="constrained")
    axes = figure.subplots()
    bars = memory_bars(report)
    colours = iter(f"C{i}" for i in range(10))
    for position, (bar, segments) in enumerate(bars.items()):
        bottom = 0.0
        for label, gib in segments:
            drawn = axes.bar(position, gib, bottom=bottom, width=0.6, color=next(colours), label=f"{bar}: {label}")
            if gib > 0:
                axes.bar_label(drawn, labels=[f"{gib:,.2f}"], label_type="center", fontsize=8)
            bottom += gib
        axes.text(position, bottom, f"total {bottom:,.2f}", ha="center", va="bottom")
    if report.get("hbm_bytes"):
        hbm = report["hbm_bytes"] / GIB
        axes.axhline(hbm, color="red", linestyle="--", label=f"HBM {hbm:,.1f} GiB per device")
    axes.set_xticks(range(len(bars)), list(bars))
    axes.set_ylabel("GiB per device")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    config = report["config"]
    mesh = ", ".join(f"{name}={size}" for name, size in config["mesh"].items() if size > 1)
    figure.suptitle(
        f"memory per device: {config['topology']}, mesh {mesh or 'one device'}, "
        f"{config['batch_size']} x {config['seq_len']} tokens"
    )
    return figure
