"""Rematerialisation of the layers: the checkpoint policies of `args.remat_policy`, and the full remat
whose recomputation waits for the cotangent.

Under `jax.checkpoint` XLA may run a backward recomputation as soon as its inputs exist. A scan's
backward loop runs one step at a time, but in straight-line code (a one-step layer group, which XLA
turns into no loop, the MTP layer, the layers inside one step of a two-kind group) XLA can schedule a
layer's recomputation early and hold its activations through the backward of every layer after it.
`after_cotangent` makes the recomputation depend on the cotangent, so at most one layer's
activations are alive in the backward. `forward_passes` counts what that costs. Reasoning and
measured effect: docs/model.md ("Remat"), docs/benchmarks.md.
"""

import functools

import jax
import jax.numpy as jnp

from model.args import OFFLOAD, ModelArgs, layer_groups

LAYER_INPUT = "layer_input"  # the streams entering each scanned step (checkpoint_name)
HOST_MEMORY = "pinned_host"  # the memory kind "offload" keeps them in

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # As "full", with each step's input streams moved to host memory in the forward pass and back
    # in the backward, instead of held on the device for the whole step.
    OFFLOAD: jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst=HOST_MEMORY,
    ),
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _after_cotangent(fn, *args):
    return fn(*args)


def _keep_inputs(fn, *args):
    return fn(*args), args


def tied_to(tree, anchor):
    """`tree` with zero times the floating scalar `anchor` added to each floating leaf: the same values,
    which XLA can compute only once `anchor` exists and cannot merge with the untied ones (it keeps
    x + 0 * y, since 0 * y is NaN for an infinite y). XLA:CPU removes optimization barriers before it
    schedules, so a data dependence is the way to order or separate work."""
    zero = anchor * 0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def _recompute(fn, args, cotangent):
    # The recomputation waits for one element of the cotangent.
    first = next(leaf for leaf in jax.tree.leaves(cotangent) if jnp.issubdtype(leaf.dtype, jnp.inexact))
    return jax.vjp(fn, *tied_to(args, first.reshape(-1)[0]))[1](cotangent)


_after_cotangent.defvjp(_keep_inputs, _recompute)


def after_cotangent(fn):
    """`fn` under full remat (only its inputs are kept for the backward), recomputed in the backward
    once its output's cotangent exists. `fn` takes every array as an argument: it closes over none."""
    return functools.partial(_after_cotangent, fn)


def under(policy: str, fn, looped: bool = False):
    """`fn` under remat `policy`: as it is for "none"; "full" outside a scan of two or more steps
    recomputes after the cotangent; otherwise `jax.checkpoint`, CSE prevented outside such a loop
    (inside one the loop already keeps XLA from merging the recomputation with the forward)."""
    if policy == "none":
        return fn
    if policy == "full" and not looped:
        return after_cotangent(fn)
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=not looped)


def forward_passes(args: ModelArgs) -> list:
    """How many times each layer's forward runs in a training step, main layers in schedule order,
    then the MTP layers: 1 without remat, 2 under remat, 3 for the layers of a two-kind group's step
    but its last, under "full" (the step's recomputation runs them to reach the last one's input, and
    each layer's backward recomputes it again)."""
    if args.remat_policy == "none":
        return [1] * (args.num_layers + args.num_mtp_layers)
    passes = []
    for pattern, repeats, _ in layer_groups(args):
        extra = (
            [1] * (len(pattern) - 1) + [0] if args.remat_policy == "full" and len(pattern) > 1 else [0] * len(pattern)
        )
        passes += [2 + e for e in extra] * repeats
    return passes + [2] * args.num_mtp_layers
