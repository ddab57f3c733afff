"""One post-training step: micro-batched forward and backward, optimizer update, MoE bias update.

The objective (an `objectives.protocol.Objective`, passed by the caller) supplies the loss; the step
is the same for all. Invariants: the objective's normalisers are counted over the whole batch first,
so the gradient accumulated over `microbatches` equals the whole batch's in one pass; a frozen model
(reference, teacher) is a step argument sharded like the trained one, never differentiated; scheduled
loss weights are read at the optimizer's applied-update count. With `indexer_weight` > 0 the indexer's own loss joins the total.
Start at `make_train_step`. Details: docs/training.md.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from data.packing import BATCH_FIELDS
from mesh.sharding import constrain, logical_to_spec
from model.params import split_variables
from model.remat import tied_to
from objectives.protocol import Objective
from trainer.nonfinite import NONFINITE, NONFINITE_STEPS, all_finite, select_finite
from trainer.optimizer import at_applied_updates
from trainer.state import TrainState

BATCH = ("act_batch", "act_length")
REPLAY_KEY = "routed_experts"  # optional [B, S, num_layers, k] int32: routing replay (main layers only)
INDEXER_LOSS = "indexer_loss"  # the step metric of the indexer's loss (with indexer_weight > 0)


def _microbatches(batch: dict, count: int) -> dict:
    """[B, S, ...] -> [count, B/count, S, ...]; micro-batch i takes rows i, i+count, ... so each stays
    spread over the batch shards."""

    def split(x):
        b = x.shape[0]
        if b % count:
            raise ValueError(f"global batch {b} is not divisible by microbatches={count}")
        return jnp.swapaxes(x.reshape(b // count, count, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def _constrained(batch: dict) -> dict:
    return {k: constrain(v, BATCH + (None,) * (v.ndim - 2)) for k, v in batch.items()}


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedule,
    train_config,
    objective: Objective,
    unroll_microbatches: bool = False,
):
    """-> step(state: TrainState, batch: dict of [B, S, ...], frozen=None) -> (state, metrics).

    train_config: balance_weight, microbatches, indexer_weight (0 when absent); `objective` supplies
    the loss (objectives.build_objective builds the configured one).
    `frozen` is {"params", "routing"} of the frozen model when `objective.uses_frozen`.
    `unroll_microbatches` unrolls the micro-batch loop (the planner's FLOP and collective counts, which
    XLA takes once per loop body), each micro-batch's weights tied to its tokens so that their gathers
    are made once per micro-batch, as in the loop; the step computes the same either way.
    """
    microbatches, balance_weight = train_config.microbatches, train_config.balance_weight
    indexer_weight = train_config.get("indexer_weight", 0.0)

    def forward(params, routing, batch, indexer_loss=False):
        """-> (model, ModelOutput without the whole logits: objectives read the head tile by tile)."""
        model = nnx.merge(graphdef, params, routing)
        return model, model(
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            routed_experts=batch.get(REPLAY_KEY),
            logits=False,
            indexer_loss=indexer_loss,
        )

    def loss_fn(params, routing, frozen, micro, normalisers, step_weights, tokens):
        """tokens: the whole batch's non-padding tokens (the indexer loss's normaliser)."""
        batch = _constrained(micro)
        model, output = forward(params, routing, batch, indexer_loss=indexer_weight > 0)
        frozen_output = None
        if objective.uses_frozen:
            frozen_output = jax.lax.stop_gradient(forward(frozen["params"], frozen["routing"], batch)[1])
        loss, metrics = objective.loss(output, batch, frozen_output, normalisers, step_weights)
        balance = jnp.sum(output.moe.balance) / max(model.args.num_score_routed_layers, 1) / microbatches
        total = loss + balance_weight * balance
        metrics = dict(
            metrics,
            balance_loss=balance,
            load=output.moe.load,
            dropped_assignments=jnp.sum(output.moe.dropped),
            expert_tiles=jnp.sum(output.moe.tiles),
        )
        if indexer_weight > 0:
            metrics[INDEXER_LOSS] = jnp.sum(output.indexer_kl) / (tokens * max(model.args.num_indexer_layers, 1))
            total = total + indexer_weight * metrics[INDEXER_LOSS]
        metrics["loss"] = total
        return total, metrics

    def step(state: TrainState, batch: dict, frozen=None):
        num_mtp = nnx.merge(graphdef, state.params, state.routing).args.num_mtp_layers
        normalisers = objective.normalisers(batch, num_mtp)
        tokens = jnp.maximum(jnp.sum(batch["segment_ids"] > 0), 1).astype(jnp.float32)
        # Each scheduled weight at the optimizer's applied-update count, the one the learning rate is read at.
        step_weights = {
            name: at_applied_updates(state.opt_state, weight, state.step)
            for name, weight in objective.weight_schedules.items()
        }
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, one):
            grads, metrics = carry
            params, frozen_params = state.params, frozen
            if unroll_microbatches:
                # Untied, the micro-batches would share one gather of each sharded weight (XLA merges
                # equal ops), where the loop gathers them once per micro-batch, as the planner counts.
                params, frozen_params = tied_to((params, frozen), one["tokens"].reshape(-1)[0].astype(jnp.float32))
            (_, m), g = grad_fn(params, state.routing, frozen_params, one, normalisers, step_weights, tokens)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

        if microbatches == 1:
            # No accumulator: the loop would hold a zero gradient tree beside the one it adds.
            (_, sums), grads = grad_fn(state.params, state.routing, frozen, batch, normalisers, step_weights, tokens)
        else:
            micro = _microbatches(batch, microbatches)
            first = jax.tree.map(lambda x: x[0], micro)
            metric_shapes = jax.eval_shape(
                lambda: loss_fn(state.params, state.routing, frozen, first, normalisers, step_weights, tokens)[1]
            )
            init = (
                jax.tree.map(jnp.zeros_like, state.params),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
            )
            (grads, sums), _ = jax.lax.scan(accumulate, init, micro, unroll=unroll_microbatches)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        load = sums.pop("load")
        # copy=True: merge otherwise shares the Variables of state.routing, and the update would
        # overwrite the biases that select_finite keeps for a refused step.
        model = nnx.merge(graphdef, params, state.routing, copy=True)
        if objective.bias_update_rate:
            model.update_routing_bias(load, objective.bias_update_rate)
        _, routing = split_variables(nnx.state(model))
        grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
        finite = all_finite(sums["loss"], grad_norm, update_norm)
        params, opt_state, routing = select_finite(
            finite, (params, opt_state, routing), (state.params, state.opt_state, state.routing)
        )
        refused = jnp.logical_not(finite).astype(jnp.int32)
        mean_load = jnp.mean(load, axis=-1)
        metrics = dict(
            sums,
            grad_norm=grad_norm,
            update_norm=update_norm,
            learning_rate=at_applied_updates(state.opt_state, schedule, state.step),
            expert_load_max_over_mean=jnp.mean(jnp.max(load, -1) / mean_load),
            expert_load=constrain(load, (None, None)),
        )
        metrics.update(step_weights)
        metrics.update({NONFINITE: refused, NONFINITE_STEPS: state.nonfinite_steps + refused})
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            routing=routing,
            rng=state.rng,
            nonfinite_steps=state.nonfinite_steps + refused,
        )
        return new_state, metrics

    return step


def batch_sharding_of(mesh, rules) -> NamedSharding:
    """Where the rows and columns of a [B, S, ...] batch array go: the `act_batch`/`act_length` rules,
    trailing axes whole."""
    return NamedSharding(mesh, logical_to_spec(BATCH, rules, dict(mesh.shape)))


def jit_train_step(step, state_shardings, mesh, rules, batch_keys=BATCH_FIELDS, frozen_shardings=None):
    """The step under jax.jit with the state's shardings in and out, the state donated, the batch
    sharded by `batch_sharding_of`, and the frozen model (when given) sharded like the trained one.
    Returns (jitted step, the batch sharding)."""
    batch_sharding = batch_sharding_of(mesh, rules)
    in_shardings = (state_shardings, {k: batch_sharding for k in batch_keys})
    in_shardings += (frozen_shardings,) if frozen_shardings is not None else ()
    return (
        jax.jit(step, in_shardings=in_shardings, out_shardings=(state_shardings, None), donate_argnums=(0,)),
        batch_sharding,
    )
