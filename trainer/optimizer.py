"""The optimizers DeepSeek-V4 trained with, as optax transformations over the model's `nnx.State` params.

`build_optimizer(config, params)` gives AdamW for everything ("adamw") or Muon for the hidden matrices
with AdamW for the rest ("muon"), behind global-norm clipping, with `learning_rate_schedule(config)`,
optionally accumulating gradients over several calls. Invariants: roles come from each parameter's
logical axis names, not its path (so the transformation must see trees structured like `params`);
moments, Newton-Schulz inputs and updates are float32 whatever the params' dtype; the indexer is frozen
unless its own loss trains it. The role rules, weight decay and precision: docs/training.md.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from configs.optimizer import decay_start
from configs.release import ConfigError
from mesh.batch_spread import over_batch
from mesh.sharding import active, resolve_spec
from trainer.state import abstract_params, state_axes, state_spec

BATCH_AXES = frozenset({"layers", "expert"})
FACTORED_AXES = {"heads": "head_dim", "index_heads": "index_head_dim", "hc": "embed", "o_groups": "o_lora"}
ADAMW_TABLE_AXES = {"vocab": True, "comp_pos": False}  # axis name -> weight-decayed
GROUPED_AXES = {"heads": "o_groups"}  # input axis -> the module axis that counts its groups
INDEXER = "indexer"  # the module name of the lightning indexer (model.attention.Attention.indexer)
MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"
MATRIX_DIMS = 2


@dataclasses.dataclass(frozen=True)
class ParamRole:
    """How one parameter is optimised (`optimizer`: MUON, ADAMW, or FROZEN: never updated). For Muon:
    axes `batch` index independent matrices whose rows
    are the `reduction` axes and columns the `output` axes; the first reduction axis is split into
    `groups` leading blocks, each its own matrix. `names`: the parameter's logical axis names."""

    optimizer: str
    decay: bool
    batch: tuple[int, ...] = ()
    reduction: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    groups: int = 1
    names: tuple[str, ...] = ()

    def matrix_shape(self, shape) -> tuple[int, int]:
        """(rows, columns) of each matrix the parameter is made of."""
        rows = math.prod(shape[a] for a in self.reduction) // self.groups
        return rows, math.prod(shape[a] for a in self.output)

    def stacked(self) -> "ParamRole":
        """This role for the [items, *non-batch axes] layout `mesh.batch_spread.over_batch` hands over."""
        rest = [a for a in range(len(self.names)) if a not in self.batch]
        position = {a: 1 + i for i, a in enumerate(rest)}
        return dataclasses.replace(
            self,
            batch=(0,),
            reduction=tuple(position[a] for a in self.reduction),
            output=tuple(position[a] for a in self.output),
            names=(),
        )


def _dimensions(names) -> list[tuple[int, ...]]:
    """Axis indices of each matrix dimension: batch axes dropped, factored pairs merged."""
    dims, i = [], 0
    while i < len(names):
        if names[i] in BATCH_AXES:
            i += 1
        elif i + 1 < len(names) and FACTORED_AXES.get(names[i]) == names[i + 1]:
            dims.append((i, i + 1))
            i += 2
        else:
            dims.append((i,))
            i += 1
    return dims


def param_role(names, shape, module_axes: dict, decay_vectors: bool) -> ParamRole:
    """The role of a parameter from its logical axis names and shape; `module_axes` maps the axis
    names of its module's parameters to their sizes (for the group split)."""
    dims = _dimensions(names)
    if len(dims) != MATRIX_DIMS:
        return ParamRole(ADAMW, decay_vectors)
    tables = [ADAMW_TABLE_AXES[n] for n in names if n in ADAMW_TABLE_AXES]
    if tables:
        return ParamRole(ADAMW, all(tables) or decay_vectors)
    reduction, output = dims
    groups = module_axes.get(GROUPED_AXES.get(names[reduction[0]]), 1)
    if shape[reduction[0]] % groups:
        raise ValueError(
            f"axis {names[reduction[0]]} of size {shape[reduction[0]]} does not split into {groups} groups"
        )
    batch = tuple(i for i, n in enumerate(names) if n in BATCH_AXES)
    return ParamRole(MUON, True, batch, reduction, output, groups, tuple(names))


def _variables(params):
    """(key path, nnx.Variable) of every parameter."""
    return jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]


def _logical_names(variable) -> tuple[str, ...]:
    names = variable.get_metadata().get("out_sharding")
    if names is None or len(names) != len(variable.shape):
        raise ValueError(f"parameter of shape {variable.shape} has no logical axis names: {names}")
    return tuple(names)


def _in_indexer(path) -> bool:
    return INDEXER in jax.tree_util.keystr(path, simple=True, separator="/").split("/")


def _roles(params, decay_vectors: bool, train_indexer: bool) -> list[tuple[tuple, nnx.Variable, ParamRole]]:
    """(key path, variable, role) of every parameter."""
    variables = [(path, var, _logical_names(var)) for path, var in _variables(params)]
    module_axes: dict[tuple, dict] = {}
    for path, var, names in variables:
        module_axes.setdefault(path[:-1], {}).update(zip(names, var.shape))
    return [
        (
            path,
            var,
            ParamRole(FROZEN, False)
            if not train_indexer and _in_indexer(path)
            else param_role(names, var.shape, module_axes[path[:-1]], decay_vectors),
        )
        for path, var, names in variables
    ]


def param_roles(params, decay_vectors: bool = False, train_indexer: bool = False) -> dict[str, ParamRole]:
    """Role of each parameter keyed by its path ("groups/0/blocks/0/attn/wq_a"): the partition table."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): role
        for path, _, role in _roles(params, decay_vectors, train_indexer)
    }


def _leaf_roles(params, decay_vectors: bool, train_indexer: bool) -> dict[str, ParamRole]:
    """Role of each array leaf, keyed by the leaf's key-path string, the key tree maps see."""
    return {
        jax.tree_util.keystr(path + leaf_path): role
        for path, var, role in _roles(params, decay_vectors, train_indexer)
        for leaf_path, _ in jax.tree_util.tree_flatten_with_path(var)[0]
    }


def _map_roles(fn, roles: dict[str, ParamRole], tree, *rest):
    """fn(role, leaf, *rest_leaves) over the leaves of `tree` (optax's masked-out nodes have none)."""
    return jax.tree_util.tree_map_with_path(lambda path, *x: fn(roles[jax.tree_util.keystr(path)], *x), tree, *rest)


def _to_matrices(x: jax.Array, role: ParamRole) -> jax.Array:
    """[..] -> [*batch axes, groups, rows, columns]. The batch axes (layers, experts) stay separate
    axes: merged into one, an expert-sharded stack would no longer be a tiling of its shards and the
    partitioner would gather it whole."""
    order = role.batch + role.reduction + role.output
    rows, columns = role.matrix_shape(x.shape)
    return x.transpose(order).reshape(*(x.shape[a] for a in role.batch), -1, rows, columns)


def _from_matrices(m: jax.Array, role: ParamRole, shape) -> jax.Array:
    order = role.batch + role.reduction + role.output
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return m.reshape([shape[a] for a in order]).transpose(inverse)


def newton_schulz(m: jax.Array, stages, eps: float, dtype) -> jax.Array:
    """Approximately orthogonalise each matrix of m [..., r, c] (push its singular values towards 1).

    Normalised by the Frobenius norm so every singular value starts at most 1, then per stage
    (iterations, a, b, c): X <- aX + b(XX^T)X + c(XX^T)^2 X. The Gram matrix is taken on the short
    side. Matmul inputs are cast to `dtype`, sums and the polynomial stay float32.
    """

    def matmul(a, b):
        return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)

    def iterate(x, abc):
        a, b, c = abc[0], abc[1], abc[2]
        gram = matmul(x, jnp.swapaxes(x, -1, -2))
        return a * x + matmul(b * gram + c * matmul(gram, gram), x), None

    coefficients = jnp.array([abc for iterations, *abc in stages for _ in range(iterations)], jnp.float32)
    wide = m.shape[-2] <= m.shape[-1]
    x = m if wide else jnp.swapaxes(m, -1, -2)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    x, _ = jax.lax.scan(iterate, x, coefficients)
    return x if wide else jnp.swapaxes(x, -1, -2)


def orthogonalize(x: jax.Array, role: ParamRole, stages, eps: float, dtype, rms_scale: float) -> jax.Array:
    """Newton-Schulz of each matrix of x, times sqrt(max(rows, columns)) * rms_scale: an orthogonal
    r x c matrix has RMS 1/sqrt(max(r, c)), so the update's RMS becomes rms_scale for every shape.

    Inside active mesh rules (the train step) the matrices are spread over the devices that shard
    the optimizer state (`mesh.batch_spread.over_batch`): each device orthogonalises its share of
    whole matrices, so none holds a gathered stack and the work is not repeated on every device."""
    rows, columns = role.matrix_shape(x.shape)
    scale = math.sqrt(max(rows, columns)) * rms_scale

    def whole(m, matrices_role):
        return _from_matrices(newton_schulz(_to_matrices(m, matrices_role), stages, eps, dtype), matrices_role, m.shape)

    current = active()
    if current is None:
        return whole(x, role) * scale
    mesh, rules = current
    sizes = dict(mesh.shape)
    spec = resolve_spec(f"Muon update {role.names}", role.names, x.shape, sizes, rules)
    spec = state_spec(tuple(spec), x.shape, sizes, state_axes(rules))
    stacked = role.stacked()
    return over_batch(lambda items: whole(items, stacked), x, spec, role.batch, mesh) * scale


class MuonState(NamedTuple):
    momentum: optax.Updates


def scale_by_muon(
    roles: dict[str, ParamRole],
    momentum: float,
    nesterov: bool,
    stages,
    eps: float,
    ns_dtype,
    rms_scale: float,
    momentum_dtype=None,
) -> optax.GradientTransformation:
    """Muon's direction, as the spec writes it: M <- mu*M + G, O = NS(mu*M + G) (NS(M) without
    Nesterov), rescaled per matrix. No (1 - mu) factor or bias correction: the Frobenius
    normalisation in NS cancels any common scale, and their absence keeps the spec's weighting of G
    against M in the first steps. Learning rate and weight decay are applied after it. M is stored
    in `momentum_dtype` (None: the gradients' dtype) and the direction computed in the gradients'."""

    def init(params):
        return MuonState(optax.tree.zeros_like(params, dtype=momentum_dtype))

    def update(grads, state, params=None):
        del params
        buffer = jax.tree.map(lambda m, g: momentum * m.astype(g.dtype) + g, state.momentum, grads)
        direction = jax.tree.map(lambda m, g: momentum * m + g, buffer, grads) if nesterov else buffer
        updates = _map_roles(lambda role, d: orthogonalize(d, role, stages, eps, ns_dtype, rms_scale), roles, direction)
        stored = jax.tree.map(lambda m, kept: m.astype(kept.dtype), buffer, state.momentum)
        return updates, MuonState(stored)

    return optax.GradientTransformation(init, update)


def _in_dtype(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """tx seeing gradients and params cast to `dtype`, so its state and updates are in that dtype."""
    cast = lambda tree: optax.tree.cast(tree, dtype)
    return optax.GradientTransformation(
        lambda params: tx.init(cast(params)),
        lambda grads, state, params=None: tx.update(cast(grads), state, cast(params)),
    )


class MasterState(NamedTuple):
    """master: float32 copies of parameters stored in a narrower dtype; inner: the optimizer's state."""

    master: optax.Params
    inner: optax.OptState


def _with_masters(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """tx updating `dtype` master copies of the parameters, kept in the state (and so sharded like it,
    over data too with ZeRO-1): the update returned is the masters' new value rounded to each
    parameter's dtype minus the parameter, so `optax.apply_updates` lands the parameter exactly on
    its rounded master and an update below the parameter dtype's spacing still accumulates."""
    cast = lambda tree: optax.tree.cast(tree, dtype)

    def init(params):
        master = cast(params)
        return MasterState(master, tx.init(master))

    def update(grads, state, params=None):
        updates, inner = tx.update(cast(grads), state.inner, state.master)
        master = optax.apply_updates(state.master, updates)
        applied = jax.tree.map(lambda m, p: m.astype(p.dtype).astype(dtype) - p.astype(dtype), master, params)
        return applied, MasterState(master, inner)

    return optax.GradientTransformation(init, update)


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup from init_lr_ratio * peak to the peak over warmup_steps, the peak held, then a
    cosine or linear decay to final_lr_ratio * peak over the last decay_steps of total_steps (all of
    them after warmup when decay_steps is None), held after; "constant" never decays."""
    peak, warmup, total = config.learning_rate, config.warmup_steps, config.total_steps
    decay_steps = total - warmup if config.decay_steps is None else config.decay_steps
    if decay_steps <= 0 or warmup + decay_steps > total:
        raise ConfigError(
            f"config.optimizer: need 0 < decay_steps ({decay_steps}) <= total_steps ({total}, "
            f"config.train.steps in a run config) - warmup_steps ({warmup})"
        )
    tails = {
        "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps, alpha=config.final_lr_ratio),
        "linear": lambda: optax.linear_schedule(peak, peak * config.final_lr_ratio, decay_steps),
        "constant": lambda: optax.constant_schedule(peak),
    }
    if config.decay not in tails:
        raise ValueError(f"decay {config.decay!r} unknown; choose one of {sorted(tails)}")
    return optax.join_schedules(
        [
            optax.linear_schedule(peak * config.init_lr_ratio, peak, warmup),
            optax.constant_schedule(peak),
            tails[config.decay](),
        ],
        boundaries=[warmup, decay_start(config)],
    )


def build_optimizer(config, params, train_indexer: bool = False) -> optax.GradientTransformation:
    """The optimizer of `config` (configs/optimizer.py) for the model's trainable `params` (an
    nnx.State of nnx.Param, concrete or abstract: only names and shapes are read). `train_indexer`:
    whether the indexer's own loss is on (config.train.indexer_weight > 0); if not, the indexer's
    parameters are frozen (optax.set_to_zero: zero updates, no decay, no state).

    Order: cast to state_dtype, clip by global norm over all parameters, then AdamW or the Muon/AdamW
    partition (and the frozen parameters), each with its own decoupled weight decay (mask:
    `ParamRole.decay`) and the shared schedule. With accumulation_steps > 1 the whole of it sits in
    `optax.MultiSteps`: gradients of that many calls are averaged (in state_dtype) and the update
    (clipping included) happens on the last call, zero updates on the others. The mean equals the gradient of the union of the batches
    when each call's loss is a mean over equally many tokens; the train step's own micro-batching
    (trainer/step.py) does not need that condition and is the first choice when one call can hold
    the batch.
    """
    roles = _leaf_roles(params, config.decay_vectors, train_indexer)
    schedule = learning_rate_schedule(config)
    decay_mask = lambda tree: _map_roles(lambda role, _: role.decay, roles, tree)
    momentum_dtype = jnp.dtype(config.momentum_dtype)
    adamw = optax.adamw(
        schedule,
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.adam_weight_decay,
        mask=decay_mask,
        mu_dtype=momentum_dtype,
    )
    transforms = {ADAMW: adamw}
    if config.name == MUON:
        transforms[MUON] = optax.chain(
            scale_by_muon(
                roles,
                config.muon_momentum,
                config.muon_nesterov,
                config.muon_ns_stages,
                config.muon_ns_eps,
                jnp.dtype(config.muon_ns_dtype),
                config.muon_rms_scale,
                momentum_dtype,
            ),
            optax.add_decayed_weights(config.muon_weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    elif config.name != ADAMW:
        raise ValueError(f"optimizer {config.name!r} unknown; choose {MUON!r} or {ADAMW!r}")
    if any(role.optimizer == FROZEN for role in roles.values()):
        transforms[FROZEN] = optax.set_to_zero()
    # Muon's matrices go to AdamW when the optimizer is "adamw".
    label = lambda role, _: role.optimizer if role.optimizer in transforms else ADAMW
    labels = lambda tree: _map_roles(label, roles, tree)
    main = optax.partition(transforms, labels) if len(transforms) > 1 else adamw
    clip = optax.clip_by_global_norm(config.clip_grad_norm) if config.clip_grad_norm > 0 else optax.identity()
    dtype = jnp.dtype(config.state_dtype)
    narrower = any(jnp.dtype(leaf.dtype) != dtype for leaf in jax.tree.leaves(params))
    wrap = _with_masters if config.master_weights and narrower else _in_dtype
    tx = wrap(optax.chain(clip, main), dtype)
    if config.accumulation_steps > 1:
        return optax.MultiSteps(tx, config.accumulation_steps, accumulator_dtype=dtype).gradient_transformation()
    return tx


def at_applied_updates(opt_state, schedule, step) -> jax.Array:
    """`schedule` (the learning rate, or any loss weight scheduled like it) at the optimizer's next
    update: read at the count of its (first) ScaleByScheduleState, which advances only with applied
    updates (not with refused steps, nor with the accumulating calls of accumulation_steps > 1). An
    optimizer that holds no such state (a constant rate) does not count: `schedule` is read at `step`."""
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
    counts = [node.count for node in jax.tree.leaves(opt_state, is_leaf=is_schedule) if is_schedule(node)]
    return schedule(counts[0] if counts else step)


def run_optimizer(config, args) -> tuple:
    """(optimizer, learning-rate schedule) of the run `config` for the model `args` (a config's model
    or a variant of it): the indexer trains only when its loss is on (config.train.indexer_weight > 0)."""
    tx = build_optimizer(config.optimizer, abstract_params(args), train_indexer=config.train.indexer_weight > 0)
    return tx, learning_rate_schedule(config.optimizer)
