"""Post-training entry point.

    python train.py --config=configs/tiny.py [--config.model.dtype=bfloat16] [--steps=N]

Today it runs the sharded forward and backward pass of the configured model on the configured
(emulated) Ascend topology and prints the loss and gradient norm per step on a synthetic batch;
the optimizer, data pipeline and checkpoints plug into this loop.
"""
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/tiny.py.")
_STEPS = flags.DEFINE_integer("steps", 1, "Forward/backward passes to run.")
_EMULATE = flags.DEFINE_bool("emulate", True, "On a CPU host, emulate the topology's devices.")
_MTP_WEIGHT = flags.DEFINE_float("mtp_weight", 0.3, "Weight of the MTP loss.")


def main(argv):
    del argv
    config = _CONFIG.value
    import jax

    from mesh.emulate import emulate
    from mesh.presets import get_topology

    if _EMULATE.value:
        jax.config.update("jax_platforms", "cpu")
        emulate(get_topology(config.mesh.topology))

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mesh.sharding import activate, logical_to_spec
    from model.args import from_config
    from model.losses import language_model_loss
    from trainer.sharded_init import build_mesh, init_sharded

    args = from_config(config.model)
    mesh = build_mesh(config.mesh)
    rules = config.mesh.rules
    logging.info("mesh %s on %d devices", dict(mesh.shape), mesh.size)
    with activate(mesh, rules):
        graphdef, state, shardings = init_sharded(args, mesh, rules, config.seed)
        params, rest = nnx.split_state(state, nnx.Param, ...)
        param_shardings, rest_shardings = nnx.split_state(shardings, nnx.Param, ...)
        batch_sharding = NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"), rules, dict(mesh.shape)))

        def loss_fn(params, rest, tokens, loss_mask):
            output = nnx.merge(graphdef, params, rest)(tokens)
            return language_model_loss(output, tokens, loss_mask, _MTP_WEIGHT.value)

        grad_step = jax.jit(
            jax.value_and_grad(loss_fn, has_aux=True),
            in_shardings=(param_shardings, rest_shardings, batch_sharding, batch_sharding),
            out_shardings=((NamedSharding(mesh, PartitionSpec()), None), param_shardings),
        )
        count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        print(f"model: {count:,} parameters, {args.num_layers} layers; mesh {dict(mesh.shape)} "
              f"on topology {config.mesh.topology} ({mesh.size} devices)")
        rng = np.random.default_rng(config.seed)
        for step in range(_STEPS.value):
            tokens = jax.device_put(
                rng.integers(0, args.vocab_size, (config.batch_size, config.seq_len), dtype=np.int32),
                batch_sharding)
            loss_mask = jax.device_put(np.ones(tokens.shape, np.int32), batch_sharding)
            start = time.perf_counter()
            (loss, metrics), grads = grad_step(params, rest, tokens, loss_mask)
            grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
            loss = float(loss)
            print(f"step {step}: loss {loss:.4f} (main {float(metrics['main_loss']):.4f}, "
                  f"mtp {float(metrics['mtp_loss']):.4f}) grad_norm {float(grad_norm):.4f} "
                  f"tokens {int(metrics['target_tokens'])} time {time.perf_counter() - start:.2f}s")
            if not np.isfinite(loss):
                raise FloatingPointError(f"step {step}: loss is {loss}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
