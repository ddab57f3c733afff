"""Pictures of a run, of a plan and of a mesh, each read back from its PNG: the expected size, not
blank, and what it claims (the expert-load heatmap's hottest cell is the expert made to overload,
the memory bars' dashed line sits at the HBM); the run's pictures also land in TensorBoard's event
files as images. Synthetic inputs throughout (a hand-made planner report, metrics written by
MetricsWriter): seconds, no training or compiling."""

import io
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from configs import parallelism
from mesh.draw import layout_figure, level_factors, peers_of_device_zero
from mesh.layout import plan_layout
from mesh.presets import get_topology
from planner.memory_picture import memory_figure
from planner.report import GIB
from trainer import pictures
from trainer.metrics import EXPERT_LOAD, EXPERT_LOAD_FILE, TENSORBOARD_DIR, MetricsWriter

LAYERS, MTP, EXPERTS = 4, 1, 8
HOT_LAYER, HOT_EXPERT = 2, 5
LOGGED_STEPS = (10, 20, 30)


def _png(figure, path):
    """Saves `figure` at `path` -> (RGB pixels [height, width, 3] read back from the file, figure)."""
    pictures.save_png(figure, path)
    return imread(str(path))[..., :3], figure


def _expected_shape(figure):
    width, height = figure.get_size_inches() * figure.dpi
    return round(height), round(width), 3


def _axes_pixels(pixels, axes):
    """The pixels inside `axes` (its window extent; the PNG's rows run top-down)."""
    box = axes.get_window_extent()
    height = pixels.shape[0]
    top, bottom = round(height - box.y1) + 2, round(height - box.y0) - 2
    left, right = round(box.x0) + 2, round(box.x1) - 2
    return pixels[top:bottom, left:right]


def _load_counts(steps=len(LOGGED_STEPS)):
    """[steps, layers + MTP, experts] assignment counts: balanced but for the hot expert of the hot
    layer at the last step."""
    counts = np.full((steps, LAYERS + MTP, EXPERTS), 100, np.int64)
    counts[-1, HOT_LAYER, HOT_EXPERT] = 400
    return counts


def test_expert_load_heatmap_shows_the_overloaded_expert(tmp_path):
    counts = _load_counts()
    figure = pictures.expert_load_figure(list(LOGGED_STEPS), counts, pictures.layer_names(LAYERS + MTP, LAYERS))
    pixels, figure = _png(figure, tmp_path / "expert_load.png")
    assert pixels.shape == _expected_shape(figure) and pixels.var() > 0
    last_step = _axes_pixels(pixels, figure.axes[0])
    hottest = np.asarray(colormaps[pictures.HEATMAP_COLORMAP](1.0)[:3])
    rows, columns = np.nonzero(np.abs(last_step - hottest).sum(-1) < 0.05)
    assert rows.size, "no pixel has the colour of the largest share"
    cell = (int(rows.mean() * (LAYERS + MTP) / last_step.shape[0]), int(columns.mean() * EXPERTS / last_step.shape[1]))
    assert cell == (HOT_LAYER, HOT_EXPERT)


def test_load_shares_per_layer():
    shares = pictures.load_shares(_load_counts()[-1])
    np.testing.assert_allclose(shares.sum(-1), 1.0)
    assert shares[HOT_LAYER, HOT_EXPERT] == pytest.approx(400 / 1100)
    assert pictures.load_shares(np.zeros((2, 4))).tolist() == [[0.0] * 4] * 2
    assert pictures.layer_names(LAYERS + MTP, LAYERS) == ["0", "1", "2", "3", "mtp0"]


def test_curves_png(tmp_path):
    records = [
        {
            "step": step,
            "loss": 3.0 - 0.1 * step,
            "learning_rate": 1e-3 * min(step, 5) / 5,
            "grad_norm": "nan" if step == 4 else 0.5,
        }
        for step in range(1, 11)
    ]
    pixels, figure = _png(pictures.curves_figure(records), tmp_path / "curves.png")
    assert pixels.shape == _expected_shape(figure) and pixels.var() > 0
    assert [axes.get_ylabel() for axes in figure.axes] == ["loss", "learning rate", "grad norm"]


def _recorded_run(workdir):
    """What a run leaves: MetricsWriter records (with the step's expert load) of LOGGED_STEPS."""
    writer = MetricsWriter(
        workdir, total_steps=LOGGED_STEPS[-1], tokens_per_step=1, flops_per_token=1.0, peak_flops=1.0
    )
    for step, counts in zip(LOGGED_STEPS, _load_counts()):
        writer.write(
            step,
            {
                "loss": jnp.float32(3.0 - 0.01 * step),
                "learning_rate": jnp.float32(1e-3),
                "grad_norm": jnp.float32(0.5),
                EXPERT_LOAD: jnp.asarray(counts, jnp.float32),
            },
        )
    writer.close()


def test_a_run_draws_its_pictures_and_puts_them_into_tensorboard(tmp_path):
    _recorded_run(tmp_path)
    loads = [json.loads(line) for line in (tmp_path / EXPERT_LOAD_FILE).read_text().splitlines()]
    assert [load["step"] for load in loads] == list(LOGGED_STEPS)
    assert np.array_equal(loads[-1][EXPERT_LOAD], _load_counts()[-1])

    paths = pictures.draw_run(tmp_path, LAYERS)
    assert sorted(paths) == [pictures.CURVES, pictures.EXPERT_LOAD_PICTURE]
    accumulator = event_accumulator.EventAccumulator(
        str(tmp_path / TENSORBOARD_DIR), size_guidance={event_accumulator.TENSORS: 0}
    )
    accumulator.Reload()
    for name, path in paths.items():
        assert path == tmp_path / pictures.PICTURES_DIR / f"{name}.png"
        events = accumulator.Tensors(f"{pictures.PICTURES_DIR}/{name}")
        assert [event.step for event in events] == [LOGGED_STEPS[-1]]
        width, height, png = events[0].tensor_proto.string_val
        assert png == path.read_bytes()
        assert Image.open(io.BytesIO(png)).size == (int(width), int(height))
        assert np.asarray(Image.open(io.BytesIO(png))).var() > 0


def test_a_run_without_records_draws_nothing(tmp_path):
    assert pictures.draw_run(tmp_path, LAYERS) == {}


def _report(hbm_gib=64.0, compiled=True):
    """planner.report.make_plan's memory fields, by hand."""
    analytic = {"weights": 20 * GIB, "gradients": 20 * GIB, "optimizer": 30 * GIB, "activations": 10 * GIB}
    report = {
        "config": {
            "topology": "cm384",
            "mesh": {"data": 1, "fsdp": 12, "expert": 64, "tensor": 1},
            "batch_size": 64,
            "seq_len": 4096,
        },
        "hbm_bytes": hbm_gib * GIB,
        "memory_analytic": dict(analytic, total=sum(analytic.values())),
        "memory_compiled": None,
    }
    if compiled:
        report["memory_compiled"] = {
            "arguments": 50 * GIB,
            "outputs": 50 * GIB,
            "aliased": 49 * GIB,
            "temporaries": 33 * GIB,
            "total": 84 * GIB,
        }
    return report


@pytest.mark.parametrize("compiled", [True, False])
def test_memory_bars_against_the_hbm(tmp_path, compiled):
    pixels, figure = _png(memory_figure(_report(compiled=compiled)), tmp_path / "memory.png")
    assert pixels.shape == _expected_shape(figure) and pixels.var() > 0
    axes = figure.axes[0]
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["analytic", "compiled"][: 1 + compiled]
    plot = _axes_pixels(pixels, axes)
    red_rows = np.nonzero((np.all(np.abs(plot - [1.0, 0.0, 0.0]) < 0.05, axis=-1)).sum(axis=1) > plot.shape[1] // 4)[0]
    hbm_row = pixels.shape[0] - axes.transData.transform((0.0, 64.0))[1]
    offset = round(pixels.shape[0] - axes.get_window_extent().y1) + 2
    assert red_rows.size and abs(red_rows.mean() + offset - hbm_row) < 3


@pytest.mark.parametrize(
    "command, flag", [(["plan.py", "--config=configs/tiny.py"], "memory_png"), (["-m", "mesh"], "draw")]
)
def test_a_picture_into_a_missing_folder_is_refused(tmp_path, command, flag):
    """Before any work: one line naming the flag, exit status 2, no traceback."""
    path = tmp_path / "absent" / "picture.png"
    result = subprocess.run([sys.executable, *command, f"--{flag}={path}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: --{flag}={path}: the folder {path.parent} does not exist"


def _layout(topology, **axes):
    config = parallelism.get_config(topology, **axes)
    return plan_layout(get_topology(config.topology), dict(config.axes), dict(config.pins))


def test_mesh_axes_on_the_levels():
    """cm384-8 (chip x2, server x2, supernode x2) with expert=4, fsdp=2: expert spans dies 0-3 over
    the chip and server links, fsdp pairs device 0 with die 4 across the supernode."""
    layout = _layout("cm384-8", expert=4, fsdp=2)
    assert level_factors(layout, ["fsdp", "expert"]).tolist() == [[1, 1, 2], [2, 2, 1]]
    assert peers_of_device_zero(layout, "expert").tolist() == [0, 1, 2, 3]
    assert peers_of_device_zero(layout, "fsdp").tolist() == [0, 4]


def test_mesh_draw_png(tmp_path):
    path = tmp_path / "mesh.png"
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "--topology=cm384", "--mesh=expert=64,fsdp=12,tensor=1", f"--draw={path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pixels = imread(str(path))[..., :3]
    assert pixels.shape == _expected_shape(layout_figure(_layout("cm384", expert=64, fsdp=12, tensor=1)))
    assert pixels.var() > 0
