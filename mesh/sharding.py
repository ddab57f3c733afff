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

_ACTIVE = threading.local()


@contextlib.contextmanager
def activate(mesh, rules):
    """Makes `constrain` apply `rules` on `mesh` inside the block (traced code included)."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, dict(rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def logical_to_spec(names, rules):
    """A PartitionSpec for a tuple of logical names; unknown names are an error."""
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        axes.append(rules[name])
    return PartitionSpec(*axes)


def constrain(x, names):
    """Sharding constraint by logical names; identity when no rules are active."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def _mesh_axes_of(rule):
    """A rule's value as a tuple of mesh axes (None -> (), 'fsdp' -> ('fsdp',))."""
    if rule is None:
        return ()
    return (rule,) if isinstance(rule, str) else tuple(rule)


def param_spec(path, names, shape, mesh, rules):
    """The checked PartitionSpec of one parameter.

    Errors name the parameter: no logical names, a name without a rule, a rule naming an axis the
    mesh lacks, a mesh axis used twice, or a dimension the mesh axes do not divide.
    """
    if names is None:
        raise ValueError(f"parameter {path}: no logical axis names (create it with "
                         f"sharding_names=(...)); every parameter must declare them")
    if len(names) != len(shape):
        raise ValueError(f"parameter {path}: {len(names)} logical names {names} for "
                         f"{len(shape)}-d shape {shape}")
    mesh_sizes = dict(mesh.shape)
    entries, used = [], {}
    for dim, (name, size) in enumerate(zip(names, shape)):
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            raise KeyError(f"parameter {path}: logical axis {name!r} (dim {dim}) has no rule; "
                           f"rules cover {sorted(rules)}")
        targets = _mesh_axes_of(rules[name])
        for axis in targets:
            if axis not in mesh_sizes:
                raise ValueError(f"parameter {path}: rule {name!r} -> {rules[name]!r} names mesh "
                                 f"axis {axis!r}, absent from the mesh {mesh_sizes}")
            if axis in used:
                raise ValueError(f"parameter {path} {shape}: mesh axis {axis!r} shards both dim "
                                 f"{used[axis]} ({names[used[axis]]!r}) and dim {dim} ({name!r})")
            used[axis] = dim
        ways = math.prod(mesh_sizes[axis] for axis in targets)
        if size % ways:
            raise ValueError(f"parameter {path} {shape}: dim {dim} ({name!r}) has size {size}, "
                             f"not divisible by {ways} = mesh axes {targets} of sizes "
                             f"{[mesh_sizes[axis] for axis in targets]}")
        entries.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*entries)


def param_shardings(abstract_state, mesh, rules):
    """NamedShardings for an nnx.State, same tree structure (use as jit out_shardings).

    Logical names come from each variable's `out_sharding` metadata; stacked layers carry the
    extra leading name given by nnx.vmap's transform_metadata. `mesh` may be an AbstractMesh, so
    full-size layouts are checked without devices.
    """
    rules = dict(rules)

    def sharding(path, variable):
        where = "/".join(str(getattr(key, "key", key)) for key in path)
        names = variable.get_metadata().get("out_sharding")
        spec = param_spec(where, names, variable.get_value().shape, mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(
        sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
