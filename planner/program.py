"""The real sharded train step of a config, lowered and compiled for abstract inputs on a mesh.

Nothing is allocated: the train state and the batch are ShapeDtypeStructs carrying their shardings,
so a 1.6T-parameter step compiles on emulated CPU devices with a few GiB of host memory.
"""
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mesh.sharding import activate
from model.args import ModelArgs
from model.transformer import DeepSeekV4
from trainer.checkpointing import abstract_train_state
from trainer.step import BATCH_KEYS, batch_sharding_of, jit_train_step, make_train_step


@dataclasses.dataclass
class CompiledStep:
    compiled: object        # jax.stages.Compiled
    state: object           # the abstract TrainState (ShapeDtypeStructs with shardings)
    lower_seconds: float
    compile_seconds: float


def abstract_batch(batch_size: int, seq_len: int, mesh, rules) -> dict:
    sharding = batch_sharding_of(mesh, rules)
    return {key: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding) for key in BATCH_KEYS}


def compile_step(args: ModelArgs, config, mesh, tx, schedule, compiler_options=None) -> CompiledStep:
    """Lowers and compiles `trainer.step` for `args` (possibly a reduced-depth variant of
    config.model) with config's batch shape, train settings and rules on `mesh`; `compiler_options`
    are XLA debug options for this compile (e.g. dumps)."""
    rules = config.mesh.rules
    with activate(mesh, rules):
        state = abstract_train_state(args, mesh, rules, tx)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepSeekV4(args, nnx.Rngs(0))))
        shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
        step, _ = jit_train_step(make_train_step(graphdef, tx, schedule, config.train), shardings, mesh, rules)
        start = time.perf_counter()
        lowered = step.lower(state, abstract_batch(config.data.global_batch_size, config.data.seq_len, mesh, rules))
        lowered_at = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options)
        done = time.perf_counter()
    return CompiledStep(compiled, state, lowered_at - start, done - lowered_at)
