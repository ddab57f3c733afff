"""One post-training step: micro-batched forward and backward, optimizer update, MoE bias update.

Gradients are accumulated over `microbatches` slices of the global batch; every loss term is a
global per-token mean (normalisers counted over the whole batch first), so the accumulated gradient
equals the one of the whole batch in one pass.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from mesh.sharding import constrain, logical_to_spec
from model.losses import language_model_loss, target_counts
from trainer.nonfinite import NONFINITE, NONFINITE_STEPS, all_finite, select_finite
from trainer.state import TrainState, split_variables

BATCH = ("act_batch", "act_length")
BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


def _microbatches(batch: dict, count: int) -> dict:
    """[B, S] -> [count, B/count, S]; micro-batch i takes rows i, i+count, ... so each stays spread over
    the batch shards."""
    def split(x):
        b = x.shape[0]
        if b % count:
            raise ValueError(f"global batch {b} is not divisible by microbatches={count}")
        return jnp.swapaxes(x.reshape(b // count, count, *x.shape[1:]), 0, 1)
    return {k: split(v) for k, v in batch.items()}


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, train_config):
    """-> step(state: TrainState, batch: dict of [B, S] int32) -> (state, metrics).

    train_config: mtp_weight, balance_weight, bias_update_rate, microbatches.
    """
    mtp_weight, balance_weight = train_config.mtp_weight, train_config.balance_weight

    def loss_fn(params, routing, micro, counts):
        model = nnx.merge(graphdef, params, routing)
        batch = {k: constrain(micro[k], BATCH) for k in BATCH_KEYS}
        output = model(batch["tokens"], batch["positions"], batch["segment_ids"])
        loss, metrics = language_model_loss(output, batch["tokens"], batch["loss_mask"], mtp_weight,
                                            batch["segment_ids"], counts)
        balance = jnp.sum(output.moe.balance) / max(model.args.num_score_routed_layers, 1)
        metrics = dict(metrics, balance_loss=balance, load=output.moe.load, dropped=jnp.sum(output.moe.dropped),
                       expert_tiles=jnp.sum(output.moe.tiles))
        return loss + balance_weight * balance / train_config.microbatches, metrics

    def step(state: TrainState, batch: dict):
        model = nnx.merge(graphdef, state.params, state.routing)
        counts = target_counts(batch["tokens"], batch["loss_mask"], batch["segment_ids"], len(model.mtp))
        micro = _microbatches(batch, train_config.microbatches)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, one):
            grads, loss, load, dropped, tiles, balance, main, mtp = carry
            (l, m), g = grad_fn(state.params, state.routing, one, counts)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, loss + l, load + m["load"], dropped + m["dropped"], tiles + m["expert_tiles"],
                    balance + m["balance_loss"] / train_config.microbatches, main + m["main_loss"],
                    mtp + m["mtp_loss"]), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        num_moe_layers = model.args.num_layers + model.args.num_mtp_layers
        scalar = jnp.zeros((), jnp.float32)
        init = (zeros, scalar, jnp.zeros((num_moe_layers, model.args.num_routed_experts)), scalar, scalar, scalar,
                scalar, scalar)
        (grads, loss, load, dropped, tiles, balance, main, mtp), _ = jax.lax.scan(accumulate, init, micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # copy=True: merge otherwise shares the Variables of state.routing, and the update would
        # overwrite the biases that select_finite keeps for a refused step.
        model = nnx.merge(graphdef, params, state.routing, copy=True)
        model.update_routing_bias(load, train_config.bias_update_rate)
        _, routing = split_variables(nnx.state(model))
        grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
        finite = all_finite(loss, grad_norm, update_norm)
        params, opt_state, routing = select_finite(finite, (params, opt_state, routing),
                                                   (state.params, state.opt_state, state.routing))
        refused = jnp.logical_not(finite).astype(jnp.int32)
        mean_load = jnp.mean(load, axis=-1)
        metrics = {
            "loss": loss, "main_loss": main, "mtp_loss": mtp, "balance_loss": balance,
            "grad_norm": grad_norm, "update_norm": update_norm, "learning_rate": schedule(state.step),
            "target_tokens": counts[0], "expert_load_max_over_mean": jnp.mean(jnp.max(load, -1) / mean_load),
            "dropped_assignments": dropped, "expert_tiles": tiles,
        }
        metrics.update({NONFINITE: refused, NONFINITE_STEPS: state.nonfinite_steps + refused})
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, routing=routing,
                               rng=state.rng, nonfinite_steps=state.nonfinite_steps + refused)
        return new_state, metrics

    return step


def batch_sharding_of(mesh, rules) -> NamedSharding:
    """Where the rows and columns of a [B, S] batch go: the `act_batch`/`act_length` rules."""
    return NamedSharding(mesh, logical_to_spec(BATCH, rules, dict(mesh.shape)))


def jit_train_step(step, state_shardings, mesh, rules):
    """The step under jax.jit with the state's shardings in and out, the state donated, and the batch
    sharded by `batch_sharding_of`."""
    batch_sharding = batch_sharding_of(mesh, rules)
    return jax.jit(step, in_shardings=(state_shardings, {k: batch_sharding for k in BATCH_KEYS}),
                   out_shardings=(state_shardings, None), donate_argnums=(0,)), batch_sharding
