"""The planner's report of one config on its topology and mesh: does the run fit, how fast would it be.

`make_plan(config)` compiles the run's programs for abstract inputs on the topology's emulated devices
(nothing allocated) and returns: parameters and tokens per step; per-device memory of the compiled
train step (its objective, micro-batches and frozen model as configured) against the HBM, beside an
analytic breakdown (a config whose expert dispatch buffers alone exceed the HBM is refused first:
planner/expert_buffers.py); with `evaluation=True` the compiled held-out decoding step as well; XLA-counted
FLOPs against the analytic model FLOPs; the collectives by kind and mesh axes with their time on the
topology's links; the estimated step time and MFU. `format_report` prints it. plan.py (with its mesh
search) and train.py --dry_run both print this report.

FLOPs and collectives come from shallow unrolled compiles extrapolated exactly to full depth
(planner/extrapolate.py), the micro-batch loop unrolled too, since XLA counts a loop body once;
memory and compile time come from the full-depth scanned program itself.
"""

import resource
import tempfile
import time

GIB = 2**30


def make_plan(
    config,
    full_compile: bool = True,
    hbm_bytes: float | None = None,
    log=print,
    peak_buffers: int = 0,
    evaluation: bool = False,
) -> dict:
    """The report (see the module docstring) for `config` on its topology and mesh; JAX must already
    see the topology's devices (mesh.emulate.emulate). `peak_buffers` > 0 adds the largest buffers
    live at the full-depth program's memory peak; `evaluation` adds the held-out decoding step
    (when config.eval.num_examples > 0), which must fit beside the optimizer state."""
    from configs import parallelism
    from mesh.layout import plan_layout
    from mesh.presets import get_topology
    from model.args import OFFLOAD, from_config
    from model.flops import train_flops_per_step
    from model.summary import count_parameters
    from planner import estimate, extrapolate, measure, memory
    from planner.expert_buffers import check_dispatch_fits
    from planner.cpu_dtypes import as_compiled_here
    from planner.program import compile_evaluation, compile_step
    from trainer.checkpointing import abstract_train_state
    from trainer.optimizer import run_optimizer

    config, stand_ins = as_compiled_here(config)
    topology = get_topology(config.mesh.topology)
    layout = plan_layout(topology, dict(config.mesh.axes), dict(config.mesh.pins))
    mesh, rules = layout.mesh(), config.mesh.rules
    args = from_config(config.model)
    tx, schedule = run_optimizer(config, args)
    devices = mesh.size
    shape = dict(mesh.shape)
    hbm = hbm_bytes if hbm_bytes is not None else topology.hbm_bytes
    check_dispatch_fits(config, hbm)
    batch_size, seq_len, microbatches = config.data.global_batch_size, config.data.seq_len, config.train.microbatches
    tokens = batch_size * seq_len

    report = {
        "config": {
            "topology": topology.name,
            "mesh": shape,
            "devices": devices,
            "expert_axes": list(parallelism.expert_mesh_axes(rules)),
            "objective": config.objective,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "microbatches": microbatches,
            "tokens_per_step": tokens,
            "compiled_as_float16": list(stand_ins),
        }
    }
    counts = count_parameters(args)
    report["parameters"] = {
        "total": counts["total_params"],
        "activated": counts["active_params"],
        "mtp": counts["mtp_params"],
    }

    compile_seconds, peak = {}, None
    if full_compile:
        log(f"compiling the full-depth step ({args.num_layers} layers, scanned) on {devices} devices ...")
        with tempfile.TemporaryDirectory() as dump_dir:
            options = dict(memory.LIVE_RANGE_DUMP, xla_dump_to=dump_dir) if peak_buffers else None
            full = compile_step(args, config, mesh, tx, schedule, options)
            if peak_buffers:
                peak = memory.peak_buffers(
                    memory.live_range_text(dump_dir),
                    memory.optimized_hlo_text(dump_dir),
                    memory.buffer_assignment_text(dump_dir),
                    peak_buffers,
                )
        compile_seconds["full"] = full.compile_seconds
        state = full.state
        compiled_memory = memory.compiled_bytes(full.compiled)
        log(
            f"full-depth step compiled in {full.compile_seconds:.0f} s: {compiled_memory['total'] / GIB:.2f} GiB per "
            f"device (temporaries {compiled_memory['temporaries'] / GIB:.2f})"
            + "".join(
                f"\n  at the peak {b['bytes'] / GIB:.2f} GiB {b['shape']} {b['what']}"
                for b in (peak or {}).get("buffers", [])
            )
        )
    else:
        state = abstract_train_state(args, mesh, rules, tx)
        compiled_memory = None

    measured = {}
    for name, repeats in extrapolate.variants(args):
        variant = extrapolate.with_repeats(args, repeats)
        log(f"compiling variant {name}: {variant.num_layers} layers unrolled ...")
        step = compile_step(variant, config, mesh, *run_optimizer(config, variant), unroll_microbatches=True)
        compile_seconds[name] = step.compile_seconds
        measured[name] = measure.measure(step.compiled, shape)
    totals = extrapolate.combine(args, measured)
    flops_per_device = totals[measure.FLOPS] + measure.uncounted_tile_flops(args, batch_size, seq_len, shape, rules)
    model_flops = train_flops_per_step(args, batch_size, seq_len)

    collectives, comm_seconds = [], 0.0
    for key in sorted(totals):
        if key == measure.FLOPS or not key.endswith("|bytes"):
            continue
        kind, axes, _ = measure.split_key(key)
        count = totals[measure.collective_key(kind, axes, "count")]
        nbytes = totals[key]
        seconds = estimate.collective_seconds(kind, axes, nbytes, layout) + (count - 1) * estimate.collective_seconds(
            kind, axes, 0.0, layout
        )
        comm_seconds += seconds
        collectives.append(
            {
                "kind": kind,
                "axes": list(axes),
                "levels": list(estimate.placement(layout, axes).levels),
                "count": round(count),
                "bytes": nbytes,
                "seconds": seconds,
            }
        )

    # Activations are those of one micro-batch: the loop frees each before the next.
    analytic = memory.analytic_bytes(args, state, batch_size // microbatches, seq_len, shape)
    per_device = compiled_memory["total"] if compiled_memory else analytic["total"]
    evaluation_memory = None
    if evaluation and config.eval.num_examples:
        log(f"compiling the evaluation's decoding step ({config.eval.batch_rows} rows) ...")
        decode = compile_evaluation(args, config, mesh, state)
        compile_seconds["evaluation"] = decode.compile_seconds
        evaluation_memory = memory.compiled_bytes(decode.compiled)
        # The optimizer state stays in device memory while the evaluation runs.
        evaluation_memory["with_optimizer_state"] = evaluation_memory["total"] + analytic["optimizer"]
    host_offload = None
    if args.remat_policy == OFFLOAD:  # the layer inputs go to host memory and come back, every step
        moved = 2 * memory.layer_input_bytes(args, batch_size // microbatches, seq_len, shape) * microbatches
        host_offload = {"bytes": moved, "seconds": moved / topology.host_bandwidth if topology.host_bandwidth else None}
    timing = estimate.step_estimate(flops_per_device, comm_seconds, model_flops, devices, topology.peak_flops)
    needed = max(per_device, evaluation_memory["with_optimizer_state"] if evaluation_memory else 0)
    report.update(
        {
            "fits": None if hbm is None else bool(needed <= hbm),
            "per_device_bytes": per_device,
            "hbm_bytes": hbm,
            "memory_compiled": compiled_memory,
            "memory_analytic": analytic,
            "memory_peak": peak,
            "memory_evaluation": evaluation_memory,
            "host_offload": host_offload,
            "compile_seconds": compile_seconds,
            "xla_flops": flops_per_device * devices,
            "model_flops": model_flops,
            "flops_ratio": flops_per_device * devices / model_flops,
            "collectives": collectives,
            "comm_seconds": comm_seconds,
            **timing,
        }
    )
    return report


def compiled_memory(config) -> dict:
    """planner.memory.compiled_bytes of `config`'s full-depth step on its topology and mesh: make_plan's
    memory figure without its variants (the time estimate)."""
    from mesh.layout import plan_layout
    from mesh.presets import get_topology
    from model.args import from_config
    from planner import memory
    from planner.cpu_dtypes import as_compiled_here
    from planner.program import compile_step
    from trainer.optimizer import run_optimizer

    config, _ = as_compiled_here(config)
    layout = plan_layout(get_topology(config.mesh.topology), dict(config.mesh.axes), dict(config.mesh.pins))
    args = from_config(config.model)
    step = compile_step(args, config, layout.mesh(), *run_optimizer(config, args))
    return memory.compiled_bytes(step.compiled)


def format_report(report: dict) -> str:
    c = report["config"]
    gib = lambda b: f"{b / GIB:,.2f} GiB"
    lines = [
        f"topology {c['topology']}: {c['devices']} devices, mesh {c['mesh']}, routed experts over "
        f"{' x '.join(c['expert_axes'])}",
        f"parameters {report['parameters']['total']:,} (activated {report['parameters']['activated']:,}); "
        f"{c['tokens_per_step']:,} tokens per step ({c['batch_size']} x {c['seq_len']}"
        + (f" in {c['microbatches']} micro-batches" if c["microbatches"] > 1 else "")
        + f"), objective {c['objective']}",
    ]
    if c.get("compiled_as_float16"):
        lines.append(
            f"bfloat16 compiled as float16, the same width, as XLA:CPU runs bf16 in float32 "
            f"(planner/cpu_dtypes.py): {', '.join(c['compiled_as_float16'])}"
        )
    fits = {None: "unknown (no HBM figure)", True: "FITS", False: "DOES NOT FIT"}[report["fits"]]
    hbm = gib(report["hbm_bytes"]) if report["hbm_bytes"] else "n/a"
    lines.append(f"memory per device: {gib(report['per_device_bytes'])} of {hbm} HBM -> {fits}")
    if report["memory_compiled"]:
        m = report["memory_compiled"]
        lines.append(
            f"  compiled: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])}, aliased "
            f"{gib(m['aliased'])}, temporaries {gib(m['temporaries'])}"
        )
    if report.get("memory_peak"):
        peak = report["memory_peak"]
        lines.append(f"  live at the compiled peak: {gib(peak['bytes'])}; the largest buffers:")
        lines += [f"    {gib(b['bytes']):>12}  {b['shape']}  {b['what']}" for b in peak["buffers"]]
    if report.get("memory_evaluation"):
        e = report["memory_evaluation"]
        lines.append(
            f"  evaluation (greedy decoding): {gib(e['total'])} compiled + the optimizer state = "
            f"{gib(e['with_optimizer_state'])}"
        )
    a = report["memory_analytic"]
    lines.append(
        f"  analytic: weights {gib(a['weights'])}, gradients {gib(a['gradients'])}, optimizer "
        f"{gib(a['optimizer'])}, activations ~{gib(a['activations'])} (total ~{gib(a['total'])})"
    )
    if report.get("host_offload"):
        h = report["host_offload"]
        time = (
            "no host link figure"
            if h["seconds"] is None
            else f"{h['seconds']:.2f} s over the host link if not overlapped"
        )
        lines.append(
            f"  layer inputs offloaded to host memory: {gib(h['bytes'])} to host and back per device and step, {time}"
        )
    lines.append(
        f"FLOPs per step: XLA {report['xla_flops']:.4g}, model {report['model_flops']:.4g} "
        f"(ratio {report['flops_ratio']:.3f})"
    )
    lines.append(f"{'collective':<20}{'mesh axes':<24}{'levels':<28}{'count':>7}{'GiB/device':>12}{'est. s':>10}")
    for entry in report["collectives"]:
        lines.append(
            f"{entry['kind']:<20}{','.join(entry['axes']):<24}{','.join(entry['levels']):<28}"
            f"{entry['count']:>7}{entry['bytes'] / GIB:>12.3f}{entry['seconds']:>10.3f}"
        )
    if report["step_time_s"] is not None:
        lines.append(
            f"estimated step: compute {report['compute_s']:.2f} s + communication "
            f"{report['comm_seconds']:.2f} s = {report['step_time_s']:.2f} s, MFU {report['mfu']:.1%}"
        )
    lines.append("compile seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["compile_seconds"].items()))
    return "\n".join(lines)


def dry_run(config, topology) -> int:
    """train.py --dry_run: make_plan of the command's run, printed, on the topology's
    devices emulated in this one process, against `topology`'s HBM; -> the exit status, 0 if it fits,
    1 if not. A tokenizer the command names is checked; the data, --init_checkpoint and the workdir
    are not touched."""
    import jax

    from configs.release import resolve_tokenizer
    from data.pipeline import build_encoder
    from mesh.emulate import emulate

    if config.get("release_dir") or config.data.tokenizer_path:
        resolve_tokenizer(config)
        build_encoder(config.data)
    jax.config.update("jax_platforms", "cpu")
    emulate(topology)
    start = time.perf_counter()
    report = make_plan(config, hbm_bytes=topology.hbm_bytes, evaluation=True)
    print(format_report(report), flush=True)
    print(
        f"dry run of {config.objective} on {topology.name}: {time.perf_counter() - start:.0f} s, peak host memory "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
        flush=True,
    )
    return 0 if report["fits"] is not False else 1
