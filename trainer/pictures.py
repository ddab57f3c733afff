"""Pictures of a run, drawn from what trainer/metrics.py recorded in the workdir.

`draw_run(workdir, num_layers)` writes `<workdir>/pictures/curves.png` (loss, learning rate and
gradient norm over the recorded steps, from `metrics.jsonl`) and `<workdir>/pictures/expert_load.png`
(each routed expert's share of its layer's token-expert assignments, from `expert_load.jsonl`:
layers x experts at the last recorded step and averaged over the run, and recorded steps x experts
averaged over the layers), and puts both into `<workdir>/tensorboard/` as images. train.py calls it at
the end of a run. Figures are matplotlib `Figure`s saved by the Agg canvas: no display, no pyplot
state. The heatmaps use `HEATMAP_COLORMAP` without interpolation, so one cell is one colour.
"""

import json
import math

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from trainer.metrics import EXPERT_LOAD, EXPERT_LOAD_FILE, GRAD_NORM, LEARNING_RATE, LOSS, METRICS_FILE, TENSORBOARD_DIR
from trainer.tensorboard_images import write_images

PICTURES_DIR = "pictures"
CURVES, EXPERT_LOAD_PICTURE = "curves", "expert_load"
HEATMAP_COLORMAP = "viridis"
DPI = 100


def read_records(path) -> list[dict]:
    """The JSON records of a JSONL file, one a line; [] when the file is absent."""
    path = epath.Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def layer_names(rows: int, num_layers: int) -> list[str]:
    """Row labels of the step's expert load: the main layers by index, then the MTP layers."""
    return [str(i) if i < num_layers else f"mtp{i - num_layers}" for i in range(rows)]


def load_shares(counts: np.ndarray) -> np.ndarray:
    """[..., experts] assignment counts -> each expert's share of its row's assignments (0 for an
    empty row); a balanced layer has 1/experts everywhere."""
    counts = np.asarray(counts, np.float64)
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def curves_figure(records: list[dict]) -> Figure:
    """Loss, learning rate and gradient norm against the step, one panel each (NaN/Inf, recorded as
    strings, are drawn as gaps)."""
    figure = Figure(figsize=(8, 7), dpi=DPI, layout="constrained")
    panels = figure.subplots(3, 1, sharex=True)
    steps = [record["step"] for record in records]
    for panel, name in zip(panels, (LOSS, LEARNING_RATE, GRAD_NORM)):
        values = [float(record.get(name, math.nan)) for record in records]
        panel.plot(steps, np.where(np.isfinite(values), values, np.nan), marker="." if len(steps) < 50 else None)
        panel.set_ylabel(name.replace("_", " "))
        panel.grid(alpha=0.3)
    panels[-1].set_xlabel("step")
    figure.suptitle("training curves")
    return figure


def _heatmap(figure, panel, shares: np.ndarray, title: str, ylabel: str, yticklabels: list[str]) -> None:
    image = panel.imshow(
        shares,
        cmap=HEATMAP_COLORMAP,
        aspect="auto",
        interpolation="nearest",
        vmin=0.0,
        vmax=max(float(shares.max()), 1e-12),
    )
    panel.set_title(title)
    panel.set_xlabel("routed expert")
    panel.set_ylabel(ylabel)
    ticks = np.unique(np.linspace(0, len(yticklabels) - 1, min(len(yticklabels), 16)).round().astype(int))
    panel.set_yticks(ticks, [yticklabels[i] for i in ticks])
    figure.colorbar(image, ax=panel, label="share of the layer's assignments")


def expert_load_figure(steps: list[int], counts: np.ndarray, names: list[str]) -> Figure:
    """counts [recorded steps, layers, experts] -> three heatmaps of load shares: layers x experts at
    the last step (`figure.axes[0]`), layers x experts averaged over the steps, steps x experts
    averaged over the layers."""
    shares = load_shares(counts)
    experts = shares.shape[-1]
    figure = Figure(figsize=(12, 11), dpi=DPI, layout="constrained")
    last, mean, over_steps = figure.subplots(3, 1)
    balanced = f"balanced: 1/{experts} = {1 / experts:.3g}"
    _heatmap(figure, last, shares[-1], f"expert load at step {steps[-1]} ({balanced})", "layer", names)
    _heatmap(
        figure, mean, shares.mean(axis=0), f"expert load averaged over {len(steps)} recorded steps", "layer", names
    )
    _heatmap(
        figure,
        over_steps,
        shares.mean(axis=1),
        "expert load averaged over the layers",
        "step",
        [str(step) for step in steps],
    )
    return figure


def save_png(figure: Figure, path) -> bytes:
    """Saves `figure` as a PNG at `path` (its folder made if missing); -> the PNG's bytes."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), dpi=DPI)
    return path.read_bytes()


def draw_run(workdir, num_layers: int) -> dict:
    """Draws the run's pictures (see the module docstring) from its recorded files; -> {name: path}
    of those drawn (none without records; the expert load needs `expert_load.jsonl`)."""
    workdir = epath.Path(workdir)
    records = read_records(workdir / METRICS_FILE)
    if not records:
        return {}
    figures = {CURVES: curves_figure(records)}
    loads = read_records(workdir / EXPERT_LOAD_FILE)
    if loads:
        counts = np.asarray([load[EXPERT_LOAD] for load in loads])
        figures[EXPERT_LOAD_PICTURE] = expert_load_figure(
            [load["step"] for load in loads], counts, layer_names(counts.shape[1], num_layers)
        )
    paths = {name: workdir / PICTURES_DIR / f"{name}.png" for name in figures}
    pngs = {f"{PICTURES_DIR}/{name}": save_png(figure, paths[name]) for name, figure in figures.items()}
    write_images(workdir / TENSORBOARD_DIR, pngs, step=records[-1]["step"])
    return paths
