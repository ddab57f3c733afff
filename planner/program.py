"""The programs a run compiles, lowered and compiled for abstract inputs on a mesh: the train step of
the config's objective (its batch, micro-batches and frozen model) and the evaluation's decoding step.

Nothing is allocated: the train state and the batch are ShapeDtypeStructs carrying their shardings,
so a 1.6T-parameter step compiles on emulated CPU devices with a few GiB of host memory. Start with
`compile_step`; `compile_evaluation` is what train.py --dry_run adds.
"""

import contextlib
import dataclasses
import time

import jax
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from mesh.sharding import activate
from model.args import ModelArgs
from model.transformer import DeepSeekV4
from planner.cpu_dtypes import COMPILER_OPTIONS
from objectives import build_objective
from trainer.checkpointing import abstract_train_state
from trainer.batch_source import batch_fields
from trainer.sampler import compile_next_tokens
from trainer.step import batch_sharding_of, jit_train_step, make_train_step


@dataclasses.dataclass
class CompiledStep:
    compiled: object  # jax.stages.Compiled
    state: object  # the abstract TrainState (ShapeDtypeStructs with shardings)
    lower_seconds: float
    compile_seconds: float


def abstract_batch(batch_keys: tuple, args: ModelArgs, batch_size: int, seq_len: int, mesh, rules) -> dict:
    sharding = batch_sharding_of(mesh, rules)
    return {
        key: jax.ShapeDtypeStruct((batch_size, *dims), dtype, sharding=sharding)
        for key, (dims, dtype) in batch_fields(batch_keys, args, seq_len).items()
    }


def _graphdef(args: ModelArgs):
    return nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))


def lower_step(args: ModelArgs, config, mesh, tx, schedule, unroll_microbatches: bool = False):
    """-> (jax.stages.Lowered, abstract TrainState): `trainer.step` for `args` (possibly a reduced-depth
    variant of config.model) with config's objective (and its frozen model as a third argument),
    batch shape, train settings and rules on `mesh`; `unroll_microbatches` as in make_train_step."""
    rules = config.mesh.rules
    objective = build_objective(config)
    with activate(mesh, rules):
        state = abstract_train_state(args, mesh, rules, tx)
        shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
        frozen = {"params": state.params, "routing": state.routing} if objective.uses_frozen else None
        frozen_shardings = None if frozen is None else {"params": shardings.params, "routing": shardings.routing}
        step, _ = jit_train_step(
            make_train_step(_graphdef(args), tx, schedule, config.train, objective, unroll_microbatches),
            shardings,
            mesh,
            rules,
            objective.batch_keys,
            frozen_shardings,
        )
        batch = abstract_batch(
            objective.batch_keys, args, config.data.global_batch_size, config.data.seq_len, mesh, rules
        )
        return step.lower(state, batch, *(() if frozen is None else (frozen,))), state


def compile_step(
    args: ModelArgs, config, mesh, tx, schedule, compiler_options=None, unroll_microbatches: bool = False
) -> CompiledStep:
    """`lower_step`, compiled; `compiler_options` are XLA debug options for this compile (e.g. dumps),
    added to the CPU ones every planner compile uses (planner.cpu_dtypes.COMPILER_OPTIONS)."""
    start = time.perf_counter()
    lowered, state = lower_step(args, config, mesh, tx, schedule, unroll_microbatches)
    lowered_at = time.perf_counter()
    options = dict(COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else {}, **(compiler_options or {}))
    with activate(mesh, config.mesh.rules):
        compiled = compile_lowered(lowered, options)
    done = time.perf_counter()
    return CompiledStep(compiled, state, lowered_at - start, done - lowered_at)


def compile_lowered(lowered, options: dict):
    """`lowered` compiled with XLA `options`; one that dumps (`xla_dump_to`) is compiled by XLA, never
    read from JAX's persistent compilation cache, whose key leaves the dump options out: a hit
    would dump nothing."""
    bypass = _without_persistent_cache() if "xla_dump_to" in options else contextlib.nullcontext()
    with bypass:
        return lowered.compile(compiler_options=options or None)


@contextlib.contextmanager
def _without_persistent_cache():
    # JAX decides once per process whether the cache is used: reset, so the switch is read again.
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def compile_evaluation(args: ModelArgs, config, mesh, state) -> CompiledStep:
    """The held-out evaluation's greedy decoding step (config.eval: batch_rows rows of max_prompt_len +
    max_new_tokens tokens) for the abstract train `state`'s weights, as train.py compiles it."""
    rules = config.mesh.rules
    with activate(mesh, rules):
        start = time.perf_counter()
        compiled = compile_next_tokens(
            _graphdef(args),
            state.params,
            state.routing,
            batch_rows=config.eval.batch_rows,
            length=config.eval.max_prompt_len + config.eval.max_new_tokens,
            batch_sharding=batch_sharding_of(mesh, rules),
        )
        done = time.perf_counter()
    return CompiledStep(compiled, state, 0.0, done - start)
