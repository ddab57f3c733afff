"""The dispatch buffers the planner counts (planner/expert_buffers.py) against the arrays the dispatch
really exchanges, the shipped full-size configs' bounded buffers, and the refusal of a config whose
worst-case buffers alone exceed the HBM (one line naming the field and the numbers, exit status 2)."""

import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny, v4_flash, v4_pro
from configs.parallelism import RULES
from configs.release import ConfigError
from mesh.sharding import activate
from model.args import from_config
from model.expert_dispatch import routed_experts
from model.moe import Routing
from planner.expert_buffers import GIB, check_dispatch_fits, dispatch_buffers, run_dispatch_buffers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS, WIDTH, HIDDEN, EXPERTS, TOP_K = 64, 16, 8, 8, 2
MESH_SHAPE = {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


def _all_to_all_operands(jaxpr) -> list:
    """Shapes and dtypes of every all_to_all operand in `jaxpr`, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "all_to_all":
            found.append((math.prod(eqn.invars[0].aval.shape), eqn.invars[0].aval.dtype))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _all_to_all_operands(inner)
    return found


@pytest.mark.parametrize("capacity_factor", [0.0, 1.25])
def test_the_counted_buffers_are_what_the_dispatch_exchanges(capacity_factor):
    """The sent rows go out and the returned rows come back through all_to_all with exactly the
    element counts and dtypes the planner counts, dropless and capped."""
    args = dataclasses.replace(
        from_config(tiny.get_config().model),
        num_routed_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        hidden_size=WIDTH,
        moe_intermediate_size=HIDDEN,
        capacity_factor=capacity_factor,
        moe_dispatch="padded",
        dtype="bfloat16",
    )
    rng = np.random.default_rng(0)
    experts = jnp.asarray(np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(TOKENS)]), jnp.int32)
    routing = Routing(experts, jnp.full((TOKENS, TOP_K), 0.5, jnp.float32), None)
    x = jnp.zeros((TOKENS, WIDTH), jnp.bfloat16)
    w13 = jnp.zeros((EXPERTS, WIDTH, HIDDEN), jnp.bfloat16)
    w2 = jnp.zeros((EXPERTS, HIDDEN, WIDTH), jnp.bfloat16)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(tuple(MESH_SHAPE.values())), tuple(MESH_SHAPE))
    with activate(mesh, RULES):
        jaxpr = jax.make_jaxpr(
            lambda x: routed_experts(x, routing, w13, w13, w2, limit=10.0, capacity_factor=capacity_factor or None)[0]
        )(x)
    tokens_per_device = TOKENS // (MESH_SHAPE["data"] * MESH_SHAPE["expert"])
    buffers = {b.what: b for b in dispatch_buffers(args, tokens_per_device, expert_shards=4, tensor=1)}
    exchanged = _all_to_all_operands(jaxpr.jaxpr)
    for what in ("sent rows", "returned rows"):
        buffer = buffers[what]
        assert (math.prod(buffer.shape), np.dtype(buffer.dtype)) in exchanged, (what, buffer, exchanged)
    capped = math.ceil(1.25 * tokens_per_device * TOP_K / EXPERTS)
    assert buffers["sent rows"].shape == (EXPERTS, capped if capacity_factor else tokens_per_device, WIDTH)


def test_the_shipped_full_size_configs_bound_their_buffers():
    """Dropless, V4-Pro's dispatch needs 99 GiB per die for one layer; the shipped capacity factor
    keeps 80 rows per expert and source instead of 4,096, and every layout passes the check."""
    config = v4_pro.get_config()
    buffers = run_dispatch_buffers(config, dict(config.mesh.axes))
    assert [b.shape for b in buffers] == [(384, 80, 7168), (384, 80, 7168), (1, 384 * 80, 3072), (1, 384 * 80, 3072)]
    assert sum(b.bytes for b in buffers) < 3 * GIB
    for config in (v4_pro.get_config(), v4_pro.get_config("cm384:4x32"), v4_flash.get_config()):
        assert config.model.capacity_factor == 1.25
        check_dispatch_fits(config)
    config.model.capacity_factor = 0.0
    check_dispatch_fits(config)  # V4-Flash dropless: 40 GiB of buffers, under the HBM on their own


def test_a_dispatch_that_cannot_fit_is_refused_naming_the_field_and_bytes():
    config = v4_pro.get_config()
    config.model.capacity_factor = 0.0
    with pytest.raises(ConfigError) as error:
        check_dispatch_fits(config)
    assert str(error.value) == (
        "config.model.capacity_factor=0.0: one MoE layer's dispatch buffers alone need 99.0 GiB per device "
        "of the 59.6 GiB HBM on cm384, the largest the returned rows [384, 4096, 7168] float32 42.0 GiB; set "
        "a capacity factor that bounds them (--config.model.capacity_factor=1.25) or spread the tokens over "
        "more devices"
    )
    config.model.capacity_factor = 1.25
    config.model.moe_dispatch = "ragged"  # moves only routed rows, but must receive the worst case
    with pytest.raises(
        ConfigError,
        match=r"^config.model.moe_dispatch='ragged': .* the largest the expert "
        r"outputs \[9437184, 7168\] float32 252.0 GiB; use moe_dispatch='padded'",
    ):
        check_dispatch_fits(config)
    check_dispatch_fits(config, hbm_bytes=2**50)  # an override of the HBM is what is checked against


@pytest.mark.parametrize("tool", ["train.py", "plan.py"])
def test_the_entry_points_refuse_it_in_one_line(tmp_path, tool):
    workdir = tmp_path / "run"
    flags = [f"--workdir={workdir}", "--dry_run"] if tool == "train.py" else []
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run(
        [sys.executable, tool, "--config=configs/v4_pro.py", "--config.model.capacity_factor=0", *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [lines[0]] and lines[0].startswith(
        "error: config.model.capacity_factor=0.0: one MoE layer's dispatch buffers alone need 99.0 GiB per device"
    )
    assert not workdir.exists()
