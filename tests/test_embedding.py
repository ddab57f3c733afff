"""The embedding lookup on the sharded table (model/embedding.py) against `jnp.take` on one device:
the rows and the table's gradient, on meshes that shard the table's d over fsdp x expert and its rows
over tensor, and no whole float32 table in the compiled program of the sharded path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs.parallelism import RULES
from mesh.sharding import activate
from model.embedding import lookup

B, S, VOCAB, D = 8, 16, 96, 32
MESH_NAMES = ("data", "fsdp", "expert", "tensor")
MESHES = {"data2_fsdp2_tensor2": (2, 2, 1, 2), "fsdp2_expert2_tensor2": (1, 2, 2, 2), "fsdp8": (1, 8, 1, 1)}
TABLE_SPEC = PartitionSpec("tensor", ("fsdp", "expert"))
TOKEN_SPEC = PartitionSpec(("data", "fsdp", "expert"))


def _problem():
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=(VOCAB, D)), jnp.float32)
    tokens = rng.integers(0, VOCAB, size=(B, S))
    tokens[:, :4] = 7  # a row used many times: its gradient sums every use
    cotangent = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    return table, jnp.asarray(tokens, jnp.int32), cotangent


def _value_and_grad(table, tokens, cotangent):
    def loss(table):
        rows = lookup(table, tokens, jnp.float32)
        return jnp.sum(rows * cotangent), rows

    return jax.value_and_grad(loss, has_aux=True)(table)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_lookup_equals_take(mesh_name):
    table, tokens, cotangent = _problem()
    expected_rows = np.asarray(table)[np.asarray(tokens)]
    expected_grad = np.zeros((VOCAB, D))
    np.add.at(expected_grad, np.asarray(tokens), np.asarray(cotangent))
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(MESHES[mesh_name]), MESH_NAMES)
    args = (
        jax.device_put(table, NamedSharding(mesh, TABLE_SPEC)),
        jax.device_put(tokens, NamedSharding(mesh, TOKEN_SPEC)),
        jax.device_put(cotangent, NamedSharding(mesh, TOKEN_SPEC)),
    )
    with activate(mesh, RULES):
        shardings = ((None, NamedSharding(mesh, TOKEN_SPEC)), NamedSharding(mesh, TABLE_SPEC))
        compiled = jax.jit(_value_and_grad, out_shardings=shardings).lower(*args).compile()
        (_, rows), grad = compiled(*args)
    np.testing.assert_array_equal(np.asarray(rows), expected_rows)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-6, atol=1e-6)
    assert "all-to-all" in compiled.as_text()  # the sharded path, not the fallback
    largest = max(
        int(np.prod([int(n) for n in dims.split(",")])) for dims in re.findall(r"f32\[([0-9,]+)\]", compiled.as_text())
    )
    assert largest < VOCAB * D, "a whole float32 table is compiled in"
