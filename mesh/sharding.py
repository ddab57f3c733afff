"""Logical axis names -> mesh axes, for parameters and activations.

The model names every dimension logically (`embed`, `heads`, `act_batch`, ...); which mesh axis
(if any) carries each name is data, held by the config's rules. Outside an active rules context the
constraints are identities, so the same model code runs unsharded in reference tests.
"""
import contextlib
import threading

import jax
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
