"""Dry-run a full-size post-training step on an emulated topology: does it fit, how fast would it be.

    python plan.py --config=configs/v4_pro.py [--config.mesh.axes.expert=64 ...] [--json=plan.json]

Compiles the real sharded train step (trainer.step) for abstract inputs on as many emulated CPU
devices as the topology has (nothing is allocated) and reports: parameters and tokens per step,
per-device memory from the compiled program against the device's HBM with an analytic breakdown,
XLA-counted FLOPs against the analytic model FLOPs, the collectives by kind and mesh axes with their
estimated time on the topology's links, the estimated step time and MFU.

FLOPs and collectives come from shallow unrolled compiles extrapolated exactly to full depth
(planner/extrapolate.py), since the scanned program counts each layer body once; memory and compile
time come from the full-depth scanned program itself (--full_compile).
"""
import json
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/v4_pro.py.")
_JSON = flags.DEFINE_string("json", None, "Also write the report as one JSON object to this file.")
_FULL = flags.DEFINE_bool("full_compile", True,
                          "Compile the full-depth scanned step for memory and compile time (else the "
                          "memory figures are the analytic ones only).")
_PEAK_BUFFERS = flags.DEFINE_integer(
    "peak_buffers", 0, "With --full_compile: list this many of the largest buffers live at the compiled "
    "program's memory peak, named by the JAX op that made them (XLA's live-range dump, written to a "
    "temporary directory: a few hundred MB for a full-size step).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Override the topology's HBM per device (GiB).")
_SEARCH = flags.DEFINE_bool("search", False,
                            "Rank every mesh of the topology by estimated step time among those that fit "
                            "(analytic, planner/search.py), then compile the best --search_confirm of them "
                            "instead of the config's own mesh.")
_SEARCH_TOP = flags.DEFINE_integer("search_top", 10, "Candidates listed by --search.")
_SEARCH_CONFIRM = flags.DEFINE_integer("search_confirm", 1, "Best fitting candidates --search compiles.")
_SEARCH_MAX_TENSOR = flags.DEFINE_integer("search_max_tensor", 8, "Largest tensor axis --search tries.")

GIB = 2 ** 30


def _optimizer(config, args):
    from trainer.optimizer import build_optimizer, learning_rate_schedule
    from trainer.state import abstract_params

    return build_optimizer(config.optimizer, abstract_params(args)), learning_rate_schedule(config.optimizer)


def make_plan(config, full_compile: bool = True, hbm_bytes: float | None = None, log=print,
              peak_buffers: int = 0) -> dict:
    """The report (see the module docstring) for `config` on its topology and mesh; JAX must already
    see the topology's devices (mesh.emulate.emulate). `peak_buffers` > 0 adds the largest buffers
    live at the full-depth program's memory peak."""
    from configs import parallelism
    from mesh.layout import plan_layout
    from mesh.presets import get_topology
    from model.args import from_config
    from model.flops import train_flops_per_step
    from model.summary import count_parameters
    from planner import estimate, extrapolate, measure, memory
    from planner.program import compile_step
    from trainer.checkpointing import abstract_train_state

    topology = get_topology(config.mesh.topology)
    layout = plan_layout(topology, dict(config.mesh.axes), dict(config.mesh.pins))
    mesh, rules = layout.mesh(), config.mesh.rules
    args = from_config(config.model)
    if config.train.microbatches != 1:
        # The micro-batch loop is a scan, whose body XLA counts once like the layers'.
        raise ValueError(f"config.train.microbatches={config.train.microbatches}: plan.py counts FLOPs and "
                         f"collectives of one pass over the batch; plan with microbatches=1 and "
                         f"batch_size / microbatches (memory then covers one micro-batch's activations)")
    tx, schedule = _optimizer(config, args)
    devices = mesh.size
    shape = dict(mesh.shape)
    hbm = hbm_bytes if hbm_bytes is not None else topology.hbm_bytes
    tokens = config.data.global_batch_size * config.data.seq_len

    report = {"config": {"topology": topology.name, "mesh": shape, "devices": devices,
                         "expert_axes": list(parallelism.expert_mesh_axes(rules)),
                         "batch_size": config.data.global_batch_size, "seq_len": config.data.seq_len,
                         "tokens_per_step": tokens}}
    counts = count_parameters(args)
    report["parameters"] = {"total": counts["total_params"], "activated": counts["active_params"],
                            "mtp": counts["mtp_params"]}

    compile_seconds, peak = {}, None
    if full_compile:
        log(f"compiling the full-depth step ({args.num_layers} layers, scanned) on {devices} devices ...")
        with tempfile.TemporaryDirectory() as dump_dir:
            options = dict(memory.LIVE_RANGE_DUMP, xla_dump_to=dump_dir) if peak_buffers else None
            full = compile_step(args, config, mesh, tx, schedule, options)
            if peak_buffers:
                peak = memory.peak_buffers(memory.live_range_text(dump_dir), peak_buffers)
        compile_seconds["full"] = full.compile_seconds
        state = full.state
        compiled_memory = memory.compiled_bytes(full.compiled)
    else:
        state = abstract_train_state(args, mesh, rules, tx)
        compiled_memory = None

    measured = {}
    for name, repeats in extrapolate.variants(args):
        variant = extrapolate.with_repeats(args, repeats)
        log(f"compiling variant {name}: {variant.num_layers} layers unrolled ...")
        step = compile_step(variant, config, mesh, *_optimizer(config, variant))
        compile_seconds[name] = step.compile_seconds
        measured[name] = measure.measure(step.compiled, shape)
    totals = extrapolate.combine(args, measured)
    flops_per_device = totals[measure.FLOPS] + measure.uncounted_tile_flops(
        args, config.data.global_batch_size, config.data.seq_len, shape, rules)
    model_flops = train_flops_per_step(args, config.data.global_batch_size, config.data.seq_len)

    collectives, comm_seconds = [], 0.0
    for key in sorted(totals):
        if key == measure.FLOPS or not key.endswith("|bytes"):
            continue
        kind, axes, _ = measure.split_key(key)
        count = totals[measure.collective_key(kind, axes, "count")]
        nbytes = totals[key]
        seconds = (estimate.collective_seconds(kind, axes, nbytes, layout)
                   + (count - 1) * estimate.collective_seconds(kind, axes, 0.0, layout))
        comm_seconds += seconds
        collectives.append({"kind": kind, "axes": list(axes), "levels": list(estimate.placement(layout, axes).levels),
                            "count": round(count), "bytes": nbytes, "seconds": seconds})

    analytic = memory.analytic_bytes(args, state, config.data.global_batch_size, config.data.seq_len, shape)
    per_device = compiled_memory["total"] if compiled_memory else analytic["total"]
    timing = estimate.step_estimate(flops_per_device, comm_seconds, model_flops, devices, topology.peak_flops)
    report.update({
        "fits": None if hbm is None else bool(per_device <= hbm),
        "per_device_bytes": per_device, "hbm_bytes": hbm,
        "memory_compiled": compiled_memory, "memory_analytic": analytic, "memory_peak": peak,
        "compile_seconds": compile_seconds,
        "xla_flops": flops_per_device * devices, "model_flops": model_flops,
        "flops_ratio": flops_per_device * devices / model_flops,
        "collectives": collectives, "comm_seconds": comm_seconds, **timing,
    })
    return report


def format_report(report: dict) -> str:
    c = report["config"]
    gib = lambda b: f"{b / GIB:,.2f} GiB"
    lines = [f"topology {c['topology']}: {c['devices']} devices, mesh {c['mesh']}, routed experts over "
             f"{' x '.join(c['expert_axes'])}",
             f"parameters {report['parameters']['total']:,} (activated {report['parameters']['activated']:,}); "
             f"{c['tokens_per_step']:,} tokens per step ({c['batch_size']} x {c['seq_len']})"]
    fits = {None: "unknown (no HBM figure)", True: "FITS", False: "DOES NOT FIT"}[report["fits"]]
    hbm = gib(report["hbm_bytes"]) if report["hbm_bytes"] else "n/a"
    lines.append(f"memory per device: {gib(report['per_device_bytes'])} of {hbm} HBM -> {fits}")
    if report["memory_compiled"]:
        m = report["memory_compiled"]
        lines.append(f"  compiled: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, aliased "
                     f"{gib(m['aliased'])}, temporaries {gib(m['temporaries'])}")
    if report.get("memory_peak"):
        peak = report["memory_peak"]
        lines.append(f"  live at the compiled peak: {gib(peak['bytes'])}; the largest buffers:")
        lines += [f"    {gib(b['bytes']):>12}  {b['what']}" for b in peak["buffers"]]
    a = report["memory_analytic"]
    lines.append(f"  analytic: weights {gib(a['weights'])}, gradients {gib(a['gradients'])}, optimizer "
                 f"{gib(a['optimizer'])}, activations ~{gib(a['activations'])} (total ~{gib(a['total'])})")
    lines.append(f"FLOPs per step: XLA {report['xla_flops']:.4g}, model {report['model_flops']:.4g} "
                 f"(ratio {report['flops_ratio']:.3f})")
    lines.append(f"{'collective':<20}{'mesh axes':<24}{'levels':<28}{'count':>7}{'GiB/device':>12}{'est. s':>10}")
    for entry in report["collectives"]:
        lines.append(f"{entry['kind']:<20}{','.join(entry['axes']):<24}{','.join(entry['levels']):<28}"
                     f"{entry['count']:>7}{entry['bytes'] / GIB:>12.3f}{entry['seconds']:>10.3f}")
    if report["step_time_s"] is not None:
        lines.append(f"estimated step: compute {report['compute_s']:.2f} s + communication "
                     f"{report['comm_seconds']:.2f} s = {report['step_time_s']:.2f} s, MFU {report['mfu']:.1%}")
    lines.append("compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["compile_seconds"].items()))
    return "\n".join(lines)


def search_and_confirm(config, full_compile: bool, hbm_bytes, top: int, confirm: int, max_tensor: int,
                       log=print, peak_buffers: int = 0) -> dict:
    """`--search`: the ranked candidates, then make_plan of the best `confirm` fitting ones; the report
    of the one the compile estimates fastest among those that fit (else the first), with the search."""
    from mesh.presets import get_topology
    from model.args import from_config
    from planner import search

    topology = get_topology(config.mesh.topology)
    hbm = hbm_bytes if hbm_bytes is not None else topology.hbm_bytes
    args = from_config(config.model)
    table = search.tensors(args, _optimizer(config, args)[0])
    candidates = search.search(args, config, topology, table, hbm, max_tensor)
    log(search.format_table(candidates, top))
    best = [c for c in candidates if not c.rejected and c.fits][:confirm]
    if not best:
        raise ValueError(f"--search: no mesh of {topology.name} fits {config.data.global_batch_size} x {config.data.seq_len} "
                         f"in {hbm / GIB:.1f} GiB per device by the analytic estimate")
    reports = []
    for candidate in best:
        log(f"confirming {candidate.name} by compiling it ...")
        reports.append(make_plan(search.apply(config, candidate), full_compile, hbm_bytes, log, peak_buffers))
        reports[-1]["search_estimate"] = search.as_dict(candidate)
    ranked = sorted(reports, key=lambda r: (not r["fits"], r["step_time_s"] or 0.0))
    report = dict(ranked[0])
    report["search"] = {"candidates": [search.as_dict(c) for c in candidates if not c.rejected][:top],
                        "considered": len(candidates), "rejected": search.rejection_counts(candidates),
                        "confirmed": [{"mesh": r["config"]["mesh"], "fits": r["fits"],
                                       "per_device_bytes": r["per_device_bytes"], "step_time_s": r["step_time_s"],
                                       "estimate": r["search_estimate"]} for r in reports]}
    return report


def main(argv):
    del argv
    import jax

    from mesh.emulate import emulate
    from mesh.presets import get_topology

    config = _CONFIG.value
    jax.config.update("jax_platforms", "cpu")
    emulate(get_topology(config.mesh.topology))
    start = time.perf_counter()
    hbm = None if _HBM_GIB.value is None else _HBM_GIB.value * GIB
    if _SEARCH.value:
        report = search_and_confirm(config, _FULL.value, hbm, _SEARCH_TOP.value, _SEARCH_CONFIRM.value,
                                    _SEARCH_MAX_TENSOR.value, peak_buffers=_PEAK_BUFFERS.value)
    else:
        report = make_plan(config, _FULL.value, hbm, peak_buffers=_PEAK_BUFFERS.value)
    report["wall_seconds"] = time.perf_counter() - start
    print(format_report(report), flush=True)
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
