"""Throughput and FLOP efficiency of the sharded train step, tiny config, 8 emulated devices.

    python bench/step.py [--steps=5] [--meshes=fsdp=8;data=2,expert=4;fsdp=2,expert=2,tensor=2]

Prints one JSON object: per mesh, tokens/s of the step with the expert-parallel MoE dispatch, the
ratio of executed FLOPs to the analytic training FLOPs (`model.flops`), and the ratio of the step
time with that dispatch to the step time with the dense all-experts reference. Executed FLOPs are
XLA's compiled cost analysis times the device count, with the layers unrolled so no scan body is
undercounted; the tiled expert MLP's while loops are counted once each by XLA, so the tiles the
step reports running add (tiles - loops) x the XLA-counted FLOPs of one forward and one backward
tile (`model.grouped_mlp.tile_flops`). Timings on this
machine are noisy; the two dispatches are measured in the same run, alternating.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per mesh and dispatch (after one warm-up).")
_MESHES = flags.DEFINE_string(
    "meshes", "fsdp=8;data=2,expert=4;fsdp=2,expert=2,tensor=2", "Semicolon-separated meshes, each axis=size pairs."
)
_DISPATCH = flags.DEFINE_string("dispatch", "padded", "The expert-parallel dispatch to measure.")
_CAPACITY = flags.DEFINE_float("capacity_factor", 0.0, "Capacity factor of the measured dispatch (0: dropless).")
_DEVICES = 8


def _uncounted_tile_flops(args, tiles: float, tokens: int, mesh, rules) -> float:
    """FLOPs of the tiles run beyond the one forward and one backward body per MoE layer and device
    that XLA's cost analysis includes (no remat: each forward loop runs once)."""
    from planner.measure import tile_body_flops
    from planner.memory import tokens_per_device

    if args.remat_policy != "none":
        raise ValueError(f"tile accounting assumes remat_policy='none', got {args.remat_policy!r}")
    forward, backward = tile_body_flops(args, tokens_per_device(tokens, dict(mesh.shape)), dict(mesh.shape), rules)
    loops = mesh.size * (args.num_layers + args.num_mtp_layers)
    return (tiles - loops) * (forward + backward)


def main(argv):
    del argv
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES)
    import numpy as np
    import optax

    from configs import parallelism, tiny
    from mesh.sharding import activate
    from model.args import from_config
    from model.flops import train_flops_per_token
    from objectives import build_objective
    from trainer.sharded_init import build_mesh
    from trainer.state import create_train_state
    from trainer.step import jit_train_step, make_train_step

    config = tiny.get_config()
    train_config = config.train
    train_config.microbatches = 1
    rng = np.random.default_rng(0)
    shape = (config.data.global_batch_size, config.data.seq_len)
    batch = {
        "tokens": rng.integers(0, config.model.vocab_size, shape, dtype=np.int32),
        "loss_mask": np.ones(shape, np.int32),
        "segment_ids": np.ones(shape, np.int32),
        "positions": np.broadcast_to(np.arange(config.data.seq_len, dtype=np.int32), shape).copy(),
    }
    tokens = float(np.prod(shape))
    results = []
    for text in _MESHES.value.split(";"):
        axes = {k: int(v) for k, v in (pair.split("=") for pair in text.split(","))}
        mesh_config = parallelism.get_config(config.mesh.topology, **axes)
        mesh = build_mesh(mesh_config)
        timings, flops = {}, None
        for dispatch in ("dense", _DISPATCH.value):
            model_config = config.model.copy_and_resolve_references()
            model_config.update(
                scan_layers=False,
                moe_dispatch=dispatch,
                capacity_factor=0.0 if dispatch == "dense" else _CAPACITY.value,
            )
            args = from_config(model_config)
            tx = optax.adamw(1e-4)
            with activate(mesh, mesh_config.rules):
                graphdef, state, shardings = create_train_state(args, mesh, mesh_config.rules, tx, config.seed)
                step, _ = jit_train_step(
                    make_train_step(graphdef, tx, optax.constant_schedule(1e-4), train_config, build_objective(config)),
                    shardings,
                    mesh,
                    mesh_config.rules,
                )
                compiled = step.lower(state, batch).compile()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                start = time.perf_counter()
                for _ in range(_STEPS.value):
                    state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                timings[dispatch] = (time.perf_counter() - start) / _STEPS.value
            if dispatch != "dense":
                counted = compiled.cost_analysis()["flops"] * mesh.size
                if args.expert_tile:
                    counted += _uncounted_tile_flops(
                        args, float(metrics["expert_tiles"]), int(tokens), mesh, mesh_config.rules
                    )
                flops = counted / (train_flops_per_token(args, config.data.seq_len) * tokens)
        results.append(
            {
                "mesh": text,
                "tokens_per_sec": tokens / timings[_DISPATCH.value],
                "flops_ratio": flops,
                "moe_dispatch_ratio": timings[_DISPATCH.value] / timings["dense"],
                "step_seconds": timings,
            }
        )
    print(
        json.dumps(
            {
                "config": "tiny",
                "devices": _DEVICES,
                "batch": list(shape),
                "dispatch": _DISPATCH.value,
                "capacity_factor": _CAPACITY.value,
                "meshes": results,
            }
        )
    )


if __name__ == "__main__":
    app.run(main)
