"""Logical axis names -> mesh axes, for parameters and activations.

The model names every dimension logically (`embed`, `heads`, `act_batch`, ...); which mesh axis
(if any) carries each name is data, held by the config's rules. Outside an active rules context the
constraints are identities, so the same model code runs unsharded in reference tests.
"""

import contextlib
import math
import threading

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mesh.axes import mesh_axes_of

_ACTIVE = threading.local()


def candidates(rules):
    """Ordered rules -> {logical name: [targets, ...]}.

    A name may have several rules: the first whose mesh axes are still free in the tensor at hand
    wins (as flax's logical rules do). So `embed -> (fsdp, expert)` then `embed -> None` shards a
    weight's `embed` dim unless another dim of that weight already took those axes.
    """
    if isinstance(rules, dict):
        return {name: [target] for name, target in rules.items()}
    table = {}
    for name, target in rules:
        table.setdefault(name, []).append(target)
    return table


@contextlib.contextmanager
def activate(mesh, rules):
    """Makes `constrain` apply `rules` on `mesh` inside the block (traced code included)."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, rules)
    try:
        yield
    finally:
        _ACTIVE.value = previous


def active():
    """(mesh, rules) of the innermost `activate` block, or None outside one."""
    return getattr(_ACTIVE, "value", None)


def resolve_spec(what, names, shape, mesh_sizes, rules, indivisible_falls_back=False):
    """The checked PartitionSpec of a tensor `what` with logical `names` (shape may be None).

    Errors name the tensor: a name without a rule, a rule naming an axis the mesh lacks, a name
    whose every rule needs a mesh axis another dim already took, or a dimension the chosen mesh
    axes do not divide. With `indivisible_falls_back` (activations, whose sizes vary per call: a
    sampled sequence may have any length) a rule whose axes do not divide the dimension yields to
    the name's next rule instead; only the last one is an error.
    """
    table = candidates(rules)
    entries, used = [], {}
    for dim, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise KeyError(f"{what}: logical axis {name!r} (dim {dim}) has no rule; rules cover {sorted(table)}")
        chosen = None
        for target in table[name]:
            axes = mesh_axes_of(target)
            for axis in axes:
                if axis not in mesh_sizes:
                    raise ValueError(
                        f"{what}: rule {name!r} -> {target!r} names mesh axis "
                        f"{axis!r}, absent from the mesh {mesh_sizes}"
                    )
            if not any(axis in used for axis in axes):
                divides = shape is None or shape[dim] % math.prod(mesh_sizes[axis] for axis in axes) == 0
                if divides or not indivisible_falls_back or target is table[name][-1]:
                    chosen = axes
                    break
        if chosen is None:
            taken = {axis: used[axis] for target in table[name] for axis in mesh_axes_of(target) if axis in used}
            owners = ", ".join(f"{axis!r} by dim {d} ({names[d]!r})" for axis, d in taken.items())
            raise ValueError(
                f"{what} {shape}: every rule of dim {dim} ({name!r}) needs a mesh axis "
                f"already taken ({owners}); add a fallback rule such as ({name!r}, None)"
            )
        for axis in chosen:
            used[axis] = dim
        ways = math.prod(mesh_sizes[axis] for axis in chosen)
        if shape is not None and shape[dim] % ways:
            raise ValueError(
                f"{what} {shape}: dim {dim} ({name!r}) has size {shape[dim]}, "
                f"not divisible by {ways} = mesh axes {chosen} of sizes "
                f"{[mesh_sizes[axis] for axis in chosen]}"
            )
        entries.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*entries)


def logical_to_spec(names, rules, mesh_sizes=None):
    """A PartitionSpec for a tuple of logical names; unknown names are an error."""
    if mesh_sizes is None:
        mesh_sizes = {axis: 1 for target in candidates(rules).values() for t in target for axis in mesh_axes_of(t)}
    return resolve_spec("activation", names, None, mesh_sizes, rules)


def constrain(x, names):
    """Sharding constraint by logical names; identity when no rules are active."""
    current = active()
    if current is None:
        return x
    mesh, rules = current
    spec = resolve_spec("activation", names, x.shape, dict(mesh.shape), rules, indivisible_falls_back=True)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_spec(path, names, shape, mesh, rules):
    """The checked PartitionSpec of one parameter (see `resolve_spec` for the errors)."""
    if names is None:
        raise ValueError(
            f"parameter {path}: no logical axis names (create it with "
            f"out_sharding=(...)); every parameter must declare them"
        )
    if len(names) != len(shape):
        raise ValueError(f"parameter {path}: {len(names)} logical names {names} for {len(shape)}-d shape {shape}")
    return resolve_spec(f"parameter {path}", names, shape, dict(mesh.shape), rules)


def param_shardings(abstract_state, mesh, rules):
    """NamedShardings for an nnx.State, same tree structure (use as jit out_shardings).

    Logical names come from each variable's `out_sharding` metadata; stacked layers carry the
    extra leading name given by nnx.vmap's transform_metadata. `mesh` may be an AbstractMesh, so
    full-size layouts are checked without devices.
    """

    def sharding(path, variable):
        where = "/".join(str(getattr(key, "key", key)) for key in path)
        names = variable.get_metadata().get("out_sharding")
        spec = param_spec(where, names, variable.get_value().shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_local(fn, names, *arrays):
    """fn(*arrays) run shard by shard: every array and every output of `fn` is split by the logical
    `names` of its leading dims (trailing dims whole), so `fn` must act along the whole dims only.
    For ops the partitioner does not split along batch dims but gathers whole (top-k: measured to
    all-gather the router and indexer scores of the global batch onto every device). Without active
    rules, plain fn(*arrays)."""
    current = active()
    if current is None:
        return fn(*arrays)
    mesh, rules = current
    spec = resolve_spec(
        "activation", names, arrays[0].shape[: len(names)], dict(mesh.shape), rules, indivisible_falls_back=True
    )
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec, check_vma=False)(*arrays)
