"""Plan a full-size post-training step on an emulated topology: does it fit, how fast would it be,
and (--search) which mesh of the topology is fastest among those that fit.

    python plan.py --config=configs/v4_pro.py [--config.mesh.axes.expert=64 ...] [--search] [--json=plan.json]
        [--memory_png=memory.png]

Compiles the real sharded train step (trainer.step) for abstract inputs on as many emulated CPU
devices as the topology has (nothing is allocated) and prints planner/report.py's report: memory per
device against the HBM, FLOPs, collectives, step time. `train.py --dry_run` prints the same report
for exactly the run its command line describes (evaluation included). `--memory_png` draws the memory
per device as stacked bars against the HBM (planner/memory_picture.py).
"""

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

from configs.release import ConfigError
from planner.report import GIB, compiled_memory, format_report, make_plan
from trainer.cli import exits_on_bad_input, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/v4_pro.py.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as one JSON object to this file.")
_MEMORY_PNG = flags.DEFINE_string(
    "memory_png",
    None,
    "Also draw the memory per device (analytic and compiled breakdowns as stacked "
    "bars against the HBM) into this PNG file.",
)
_FULL = flags.DEFINE_bool(
    "full_compile",
    True,
    "Compile the full-depth scanned step for memory and compile time (else the "
    "memory figures are the analytic ones only).",
)
_PEAK_BUFFERS = flags.DEFINE_integer(
    "peak_buffers",
    0,
    "With --full_compile: list this many of the largest buffers live at the compiled "
    "program's memory peak, with their shapes and the JAX op that made them (XLA's live-range dump, written to a "
    "temporary directory: a few hundred MB for a full-size step).",
)
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Override the topology's HBM per device (GiB).")
_SEARCH = flags.DEFINE_bool(
    "search",
    False,
    "Rank every mesh of the topology by estimated step time among those that fit "
    "(analytic, planner/search.py), then compile the best --search_confirm of them "
    "instead of the config's own mesh.",
)
_SEARCH_TOP = flags.DEFINE_integer("search_top", 10, "Candidates listed by --search.")
_SEARCH_CONFIRM = flags.DEFINE_integer("search_confirm", 1, "Best fitting candidates --search compiles.")
_SEARCH_MAX_TENSOR = flags.DEFINE_integer("search_max_tensor", 8, "Largest tensor axis --search tries.")
_SEARCH_MARGIN = flags.DEFINE_float(
    "search_margin",
    1.25,
    "A mesh fits --search when its analytic bytes per device times this are within the HBM: the "
    "compiled program holds more than the analytic count (docs/planning.md). 1 trusts the analytic count.",
)


def search_and_confirm(
    config,
    full_compile: bool,
    hbm_bytes,
    top: int,
    confirm: int,
    max_tensor: int,
    log=print,
    peak_buffers: int = 0,
    margin: float = 1.0,
) -> dict:
    """`--search`: the ranked candidates (a candidate fits when its analytic bytes times `margin` are
    within the HBM), then make_plan of the best `confirm` fitting ones; the report of the one the
    compile estimates fastest among those that fit (else the first), with the search and the smallest
    part of the topology that fits (`smallest_fitting_part`)."""
    from mesh.presets import get_topology
    from model.args import from_config
    from planner import search
    from trainer.optimizer import run_optimizer

    topology = get_topology(config.mesh.topology)
    hbm = hbm_bytes if hbm_bytes is not None else topology.hbm_bytes
    budget = None if hbm is None else hbm / margin
    args = from_config(config.model)
    table = search.tensors(args, run_optimizer(config, args)[0])
    candidates = search.search(args, config, topology, table, budget, max_tensor)
    if budget is not None:
        log(f"a mesh fits the search when its analytic bytes x {margin:g} are within {hbm / GIB:.2f} GiB")
    log(search.format_table(candidates, top))
    best = [c for c in candidates if not c.rejected and c.fits][:confirm]
    if not best:
        raise ValueError(
            f"--search: no mesh of {topology.name} fits {config.data.global_batch_size} x {config.data.seq_len} "
            f"in {hbm / GIB:.1f} GiB per device by the analytic estimate x {margin:g}"
        )
    reports = []
    for candidate in best:
        log(f"confirming {candidate.name} by compiling it ...")
        reports.append(make_plan(search.apply(config, candidate), full_compile, hbm_bytes, log, peak_buffers))
        reports[-1]["search_estimate"] = search.as_dict(candidate)
    ranked = sorted(reports, key=lambda r: (not r["fits"], r["step_time_s"] or 0.0))
    report = dict(ranked[0])
    report["search"] = {
        "candidates": [search.as_dict(c) for c in candidates if not c.rejected][:top],
        "considered": len(candidates),
        "rejected": search.rejection_counts(candidates),
        "confirmed": [
            {
                "mesh": r["config"]["mesh"],
                "fits": r["fits"],
                "per_device_bytes": r["per_device_bytes"],
                "step_time_s": r["step_time_s"],
                "estimate": r["search_estimate"],
            }
            for r in reports
        ],
        "smallest": smallest_fitting_part(config, args, table, hbm, max_tensor, full_compile, log, margin, reports),
    }
    return report


def smallest_fitting_part(
    config, args, table, hbm, max_tensor: int, full_compile: bool, log=print, margin: float = 1.0, confirmed=()
) -> dict | None:
    """The smallest cut of config's topology (mesh.presets.smaller_parts) on which a mesh fits by the
    analytic search (its bytes times `margin` within `hbm`), with its fastest fitting mesh, confirmed by
    compiling that step (with `full_compile`; a mesh of config's own topology among the `confirmed`
    reports is not compiled again); None when no part fits."""
    from mesh.presets import get_topology, smaller_parts
    from planner import search

    budget = None if hbm is None else hbm / margin
    found = search.smallest_topology(
        args, config, [get_topology(s) for s in smaller_parts(config.mesh.topology)], table, budget, max_tensor
    )
    if found is None:
        log("smallest topology: none of the cuts fits by the analytic estimate")
        return None
    topology, candidate = found
    smallest = {
        "topology": topology.name,
        "devices": topology.num_devices,
        "mesh": dict(candidate.axes),
        "experts_over_data": candidate.experts_over_data,
        "analytic_bytes": candidate.memory["total"],
        "compiled_bytes": None,
        "fits": None,
    }
    log(
        f"smallest topology that fits (analytic): {topology.name}, {topology.num_devices} devices, mesh "
        f"{candidate.name}, {candidate.memory['total'] / GIB:.2f} GiB per device"
    )
    if full_compile:
        same = [
            r["per_device_bytes"]
            for r in confirmed
            if topology.name == config.mesh.topology
            and (r["config"]["mesh"], r["search_estimate"]["experts_over_data"])
            == (dict(candidate.axes), candidate.experts_over_data)
        ]
        log(f"confirming {topology.name} by compiling it ..." if not same else f"{topology.name}: compiled above")
        compiled = same[0] if same else compiled_memory(search.apply(config, candidate, topology.name))["total"]
        smallest.update(compiled_bytes=compiled, fits=bool(compiled <= hbm))
        log(
            f"smallest topology, compiled: {compiled / GIB:.2f} GiB per device of {hbm / GIB:.2f} -> "
            f"{'FITS' if compiled <= hbm else 'DOES NOT FIT'}"
        )
    return smallest


def _check_output_folders() -> None:
    """Before the compiles: the folders --json and --memory_png write into exist."""
    for flag in (_JSON, _MEMORY_PNG):
        folder = os.path.dirname(os.path.abspath(flag.value)) if flag.value else None
        if folder and not os.path.isdir(folder):
            raise ConfigError(f"--{flag.name}={flag.value}: the folder {folder} does not exist")


@exits_on_bad_input
def main(argv):
    del argv
    import jax

    from mesh.emulate import emulate
    from mesh.presets import get_topology

    config = _CONFIG.value
    _check_output_folders()
    if _SEARCH_MARGIN.value < 1:
        raise ConfigError(f"--search_margin={_SEARCH_MARGIN.value}: must be at least 1 (compiled / analytic bytes)")
    jax.config.update("jax_platforms", "cpu")
    emulate(get_topology(config.mesh.topology))
    start = time.perf_counter()
    hbm = None if _HBM_GIB.value is None else _HBM_GIB.value * GIB
    if _SEARCH.value:
        report = search_and_confirm(
            config,
            _FULL.value,
            hbm,
            _SEARCH_TOP.value,
            _SEARCH_CONFIRM.value,
            _SEARCH_MAX_TENSOR.value,
            peak_buffers=_PEAK_BUFFERS.value,
            margin=_SEARCH_MARGIN.value,
        )
    else:
        report = make_plan(config, _FULL.value, hbm, peak_buffers=_PEAK_BUFFERS.value)
    report["wall_seconds"] = time.perf_counter() - start
    print(format_report(report), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=1)
    if _MEMORY_PNG.value:
        from planner.memory_picture import memory_figure

        memory_figure(report).savefig(_MEMORY_PNG.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
