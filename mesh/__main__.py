"""Print how a mesh lies on a topology: `python -m mesh --topology=cm384 --mesh=expert=64,fsdp=12`.

Axes not named in --mesh keep the defaults of configs/parallelism.py (fsdp takes the rest unless
another axis is -1). With --emulate the host also gets the topology's device count and the real
jax Mesh is built, which proves the layout on this machine's devices. `--draw=out.png` also draws
the axes laid on the topology's levels (mesh/draw.py).
"""

import os

from absl import app, flags

from configs import parallelism
from configs.release import ConfigError
from mesh import report
from mesh.emulate import emulate
from mesh.layout import plan_layout, resolve_sizes
from mesh.presets import get_topology
from trainer.cli import exits_on_bad_input, parse_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", "cm384-8", "topology spec, e.g. cm384, cm384:4, a2-cluster:2")
flags.DEFINE_string("mesh", "", "axis sizes, e.g. expert=64,fsdp=12,tensor=1 (-1 = the rest)")
flags.DEFINE_string("pin", "", "axis=level pins, e.g. fsdp=chip")
flags.DEFINE_float("bytes", 2.0**30, "message size per device for the collective estimates")
flags.DEFINE_bool("emulate", False, "set the CPU device count and build the real jax Mesh")
flags.DEFINE_string(
    "draw",
    None,
    "PNG file to draw the axes on the topology's levels into (which levels each axis crosses, which devices it spans)",
)


def _pairs(flag: str, convert, expected: str) -> dict:
    """The comma-separated name=value entries of --`flag`, each value through `convert`."""
    text = FLAGS[flag].value
    pairs = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        malformed = ConfigError(f"--{flag}={text}: entry {item!r} is not {expected}")
        if not sep:
            raise malformed
        try:
            pairs[key.strip()] = convert(value.strip())
        except ValueError:
            raise malformed from None
    return pairs


@exits_on_bad_input
def main(argv):
    del argv
    folder = os.path.dirname(os.path.abspath(FLAGS.draw)) if FLAGS.draw else None
    if folder and not os.path.isdir(folder):
        raise ConfigError(f"--draw={FLAGS.draw}: the folder {folder} does not exist")
    topology = get_topology(FLAGS.topology)
    pins = _pairs("pin", str, "axis=level")
    sizes = _pairs("mesh", int, "axis=<integer size> (-1 = the rest)")
    try:
        config = parallelism.get_config(FLAGS.topology, pins=pins, **sizes)
        resolve_sizes(dict(config.axes), topology.num_devices)
    except ConfigError as error:
        raise ConfigError(f"--mesh={FLAGS.mesh}: {error}") from error
    layout = plan_layout(topology, dict(config.axes), dict(config.pins))
    print(report.describe_topology(layout))
    print(f"mesh {layout.shape}")
    print(report.axis_table(layout, FLAGS.bytes))
    print(report.device_grid(layout))
    if FLAGS.draw:
        from mesh.draw import layout_figure

        layout_figure(layout).savefig(FLAGS.draw)
        print(f"drew {FLAGS.draw}")
    if FLAGS.emulate:
        emulate(topology)
        mesh = layout.mesh()
        ranks = [device.id for device in mesh.devices.flat]
        matches = ranks == [int(rank) for rank in layout.device_ids.flat]
        print(
            f"built jax Mesh {dict(mesh.shape)} over {mesh.devices.size} "
            f"{mesh.devices.flat[0].platform} devices; device ids follow the layout: {matches}"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
