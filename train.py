"""Post-training entry point: SFT, DPO, GRPO or on-policy distillation of a DeepSeek-V4 on an (emulated)
Ascend mesh (`--config.objective=sft|dpo|grpo|distill`, objectives/).

    python train.py --config=configs/tiny.py --workdir=DIR [--steps=N] [--dry_run]

Invariants: a run resumes from the newest complete checkpoint in DIR and repeats the interrupted one bit
for bit; a frozen reference is recorded in DIR/reference.json at the first start and read from there on
resume; a non-finite step is never applied; `--dry_run` compiles the run for abstract inputs and prints
the planner's report. Start at `main`. Restarts, objectives and checkpoints: docs/training.md; several
processes: docs/multihost.md; --dry_run: docs/planning.md.
"""

import contextlib
import dataclasses
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from trainer import distributed
from trainer.cli import exits_on_bad_input, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and TensorBoard events go here.")
_STEPS = flags.DEFINE_integer("steps", None, "Train until this step (default: config.train.steps).")
_INIT = flags.DEFINE_string(
    "init_checkpoint",
    None,
    "Workdir of an Orbax checkpoint (a train.py run, or convert.py --direction=import) "
    "whose weights start a new run. A resume restores its own; for DPO/GRPO, whose "
    "reference they are, it reads the recorded step of the recorded one, and the flag may "
    "be omitted or name that one.",
)
_ALLOW_MISSING = flags.DEFINE_list(
    "init_allow_missing",
    [],
    "Path prefixes (e.g. params/groups/2/) of weights --init_checkpoint may lack; they "
    "start from fresh initialisation. The MTP module's may always be missing (transformers saves have none).",
)
_EMULATE = flags.DEFINE_bool("emulate", True, "On a CPU host, emulate the topology's devices.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Compile the step and the evaluation this command would run, for abstract inputs on the "
    "topology's devices emulated here (nothing allocated, no data or checkpoint read, nothing written), print the "
    "planner's report (memory per device against the HBM, FLOPs, collectives, step time) and exit: 0 if it fits, "
    "1 if not.",
)


def _say(text: str) -> None:
    """A line on stdout from process 0 (the only one of a single-process run)."""
    if distributed.is_primary():
        print(text, flush=True)


def _report_heldout(when, config, graphdef, state, encoder, batch_sharding, processes):
    """Prints held-out exact-match accuracy with greedy decoding (config.eval); num_examples=0 skips
    it, e.g. for runs that only exercise training. Every process decodes (the model spans them all)."""
    if not config.eval.num_examples:
        return
    from data.evaluation import exact_match_accuracy
    from data.pipeline import load_conversations
    from trainer.generate import make_greedy_generate

    conversations = []
    for pattern, _ in config.data.eval_sources:
        conversations += load_conversations(pattern)
    conversations = conversations[: config.eval.num_examples]
    generate = make_greedy_generate(
        graphdef,
        state.params,
        state.routing,
        max_new_tokens=config.eval.max_new_tokens,
        batch_rows=config.eval.batch_rows,
        max_prompt_len=config.eval.max_prompt_len,
        stop_id=encoder.tokenizer.token_id(encoder.template.eos),
        batch_sharding=batch_sharding,
    )
    distributed.barrier(f"held-out evaluation {when} compiled", processes)
    result = exact_match_accuracy(conversations, generate, encoder)
    _say(f"held-out exact match {when}: {result['accuracy']:.3f} ({result['correct']}/{result['total']})")


def _frozen_weights(config, objective, reference, state, abstract_weights):
    """The frozen model an objective compares against, {"params", "routing"} sharded like the trained
    one, or None: distillation's teacher checkpoint at the pinned `reference` step, else (DPO/GRPO
    reference) a copy of the initial weights, taken before training (the step donates the state)."""
    import jax

    from trainer.checkpointing import Checkpointer
    from trainer.reference import TEACHER

    if not objective.uses_frozen:
        return None
    if reference["kind"] == TEACHER:
        teacher, _ = Checkpointer(reference["path"], config, keep=1, save_every=1).restore_weights(
            reference["step"], abstract_weights
        )
        return teacher
    return jax.tree.map(lambda x: x.copy(), {"params": state.params, "routing": state.routing})


def _step_batch(arrays: dict, keys: tuple, sharding) -> dict:
    """The arrays the objective reads (a source may produce more) as arrays on the mesh: global arrays
    stay as they are, host arrays (single-process sources) are placed."""
    import jax
    import numpy as np

    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"the batch lacks {missing} (it has {sorted(arrays)})")
    place = lambda a: a if isinstance(a, jax.Array) else jax.device_put(np.asarray(a), sharding)
    return {k: place(arrays[k]) for k in keys}


def _scalars(metrics: dict) -> dict:
    """The step's scalar metrics as floats: what a checkpoint records for `keep_best_metric`."""
    import numpy as np

    return {name: float(value) for name, value in metrics.items() if np.ndim(value) == 0}


def _check_best_metric(checkpoint_config, metrics: dict) -> None:
    """After the first step, before any save: `keep_best_metric` must name one of the step's metrics."""
    from configs.release import ConfigError

    name = checkpoint_config.keep_best_metric
    if name is not None and name not in _scalars(metrics):
        raise ConfigError(
            f"config.checkpoint.keep_best_metric={name!r} is not a metric of this run's step; "
            f"it has {sorted(_scalars(metrics))}"
        )


def _draw_pictures(workdir: str, num_layers: int) -> None:
    """Process 0 draws the run's pictures from its recorded metrics (trainer/pictures.py)."""
    if not distributed.is_primary():
        return
    from trainer.pictures import draw_run

    paths = draw_run(workdir, num_layers)
    if paths:
        _say("pictures: " + ", ".join(str(path) for path in paths.values()))


@exits_on_bad_input
def main(argv):
    del argv
    config = _CONFIG.value
    from configs.release import resolve_tokenizer
    from mesh.presets import get_topology
    from planner.expert_buffers import check_dispatch_fits
    from trainer.validate_config import validate_run_config

    validate_run_config(config)
    topology = get_topology(config.mesh.topology)
    if _DRY_RUN.value:
        from planner.report import dry_run

        sys.exit(dry_run(config, topology))  # the planner checks the dispatch buffers itself
    check_dispatch_fits(config)
    from data.pipeline import build_encoder
    from model.args import from_config
    from trainer.host_check import check_host

    resolve_tokenizer(config)
    build_encoder(config.data)  # tokenizer, chat template and vocabulary checked before any device work
    if _EMULATE.value:
        check_host(from_config(config.model), topology, emulated=True)
    processes = distributed.from_flags()
    distributed.initialize(processes, topology, emulate_devices=_EMULATE.value)
    if not _EMULATE.value:
        check_host(from_config(config.model), topology, emulated=False)
    if not distributed.is_primary():
        logging.set_verbosity(logging.WARNING)
    with distributed.collective_errors_named(processes):
        _train(config, topology, processes)


def _train(config, topology, processes):
    """The run, once this process has joined the others."""
    import jax

    from mesh.sharding import activate
    from model.args import from_config
    from model.flops import train_flops_per_token
    from objectives import build_objective
    from trainer.batch_source import build_batch_source
    from trainer.batches import DataExhausted
    from trainer.checkpointing import Checkpointer, abstract_train_state, check_missing
    from trainer.metrics import MetricsWriter, progress_line
    from trainer.nonfinite import NonFinitePolicy, was_refused
    from trainer.optimizer import run_optimizer
    from trainer.preemption import PreemptionGuard
    from trainer.reference import initial_checkpoint, pin_reference
    from trainer.sharded_init import build_mesh
    from trainer.state import create_train_state
    from trainer.step import batch_sharding_of, jit_train_step, make_train_step

    nonfinite_policy = NonFinitePolicy(config.train.nonfinite)
    objective = build_objective(config)
    total_steps = _STEPS.value or config.train.steps
    args = from_config(config.model)
    mesh, rules = build_mesh(config.mesh), config.mesh.rules
    workdir = _WORKDIR.value
    _say(
        f"model: {args.num_layers} layers, d={args.hidden_size}, {args.num_routed_experts} experts; "
        f"mesh {dict(mesh.shape)} on topology {config.mesh.topology} ({mesh.size} devices)"
        + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    )

    with activate(mesh, rules):
        tx, schedule = run_optimizer(config, args)
        abstract = abstract_train_state(args, mesh, rules, tx)
        graphdef, state, shardings = create_train_state(args, mesh, rules, tx, config.seed)
        # The data are read (and bad input refused) before anything is written to the workdir.
        source = build_batch_source(config, batch_sharding_of(mesh, rules), graphdef=graphdef)
        encoder = source.encoder
        os.makedirs(workdir, exist_ok=True)
        checkpointer = Checkpointer.from_config(workdir, config, config.checkpoint)
        abstract_weights = {"params": abstract.params, "routing": abstract.routing}
        resuming = checkpointer.latest_step() is not None
        reference = pin_reference(
            workdir, config, objective, _INIT.value, resuming, write=distributed.is_primary(), log=_say
        )
        start = initial_checkpoint(reference, _INIT.value, resuming)
        if start:
            init_path, init_step = start
            initial, fresh = Checkpointer(init_path, config, keep=1, save_every=1).restore_weights(
                init_step, abstract_weights, fallback={"params": state.params, "routing": state.routing}
            )
            check_missing(init_path, fresh, _ALLOW_MISSING.value)
            state = dataclasses.replace(state, params=initial["params"], routing=initial["routing"])
            _say(
                f"initial weights from {init_path}"
                + (f"; {len(fresh)} absent there keep their fresh initialisation, e.g. {fresh[0]}" if fresh else "")
            )
        frozen = _frozen_weights(config, objective, reference, state, abstract_weights)
        frozen_shardings = None if frozen is None else {"params": shardings.params, "routing": shardings.routing}
        frozen_args = () if frozen is None else (frozen,)
        step_fn, batch_sharding = jit_train_step(
            make_train_step(graphdef, tx, schedule, config.train, objective),
            shardings,
            mesh,
            rules,
            objective.batch_keys,
            frozen_shardings,
        )
        if resuming:
            state, data_state = checkpointer.restore(None, abstract)
            source.set_state(data_state)
            _say(f"resumed from step {int(state.step)} in {workdir}")
        start_step = int(state.step)
        if start_step == 0:
            _report_heldout("before training", config, graphdef, state, encoder, batch_sharding, processes)
        if jax.process_count() > 1:
            # Compiled ahead, then every process waits for the slowest: see distributed.barrier.
            step_fn = step_fn.lower(state, source.abstract(), *frozen_args).compile()
            distributed.barrier("train step compiled", processes)

        tokens_per_step = config.data.global_batch_size * config.data.seq_len
        writer = MetricsWriter(
            workdir,
            total_steps=total_steps,
            tokens_per_step=tokens_per_step,
            flops_per_token=train_flops_per_token(args, config.data.seq_len),
            peak_flops=topology.peak_flops * mesh.size,
            start_step=start_step,
            output=distributed.is_primary(),
        )
        log_every = config.checkpoint.log_every
        with contextlib.closing(checkpointer), contextlib.closing(writer), PreemptionGuard() as guard:
            for step in range(start_step, total_steps):
                try:
                    batch = source.next(state)
                except DataExhausted as end:
                    checkpointer.save(step, state, source.get_state(), force=True)
                    _say(f"{end}: saved step {step} and ending the run")
                    break
                state, metrics = step_fn(state, _step_batch(batch, objective.batch_keys, batch_sharding), *frozen_args)
                done = step + 1
                refused = was_refused(metrics)
                if refused or done == start_step + 1 or done % log_every == 0 or done == total_steps:
                    record = writer.write(done, dict(metrics, **source.metrics()))
                    _say(progress_line(record, refused))
                if refused:
                    nonfinite_policy.handle(done, record)
                if done == start_step + 1:
                    _check_best_metric(config.checkpoint, metrics)
                stopping = guard.should_stop()
                force = stopping or done == total_steps
                if checkpointer.due(done, force):
                    checkpointer.save(done, state, source.get_state(), metrics=_scalars(metrics), force=force)
                if stopping:
                    checkpointer.wait()
                    _say(
                        f"{guard.signal_name or 'a signal (on another process)'} received: saved step {done} "
                        "and stopping"
                    )
                    return
        _draw_pictures(workdir, args.num_layers)
        _report_heldout(f"after {int(state.step)} steps", config, graphdef, state, encoder, batch_sharding, processes)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=parse_flags)
