"""remat_policy="offload": the layer inputs go to host memory in the backward's program and the
loss and every gradient equal plain remat's; a platform without host memory is refused in one line;
the planner counts the bytes moved. XLA:CPU lowers the host copies as plain copies, so what the
device would save is counted (planner.memory), not measured, here."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.tiny
from configs.release import ConfigError
from mesh.presets import get_topology
from model.args import from_config
from model.transformer import DeepSeekV4
from planner import memory
from trainer.host_check import check_memory_kinds


def _args(policy):
    config = configs.tiny.get_config()
    config.model.remat_policy = policy
    return from_config(config.model)


def _loss_and_vjp(policy):
    """-> (loss, gradients, jaxpr text of the backward) of a sum of squared logits on 2 x 32 tokens."""
    args = _args(policy)
    graphdef, weights, rest = nnx.split(DeepSeekV4(args, nnx.Rngs(0)), nnx.Param, ...)
    tokens = jnp.arange(64).reshape(2, 32) % args.vocab_size
    positions = jnp.broadcast_to(jnp.arange(32), (2, 32))
    segments = jnp.ones((2, 32), jnp.int32)

    def loss(weights):
        return jnp.mean(nnx.merge(graphdef, weights, rest)(tokens, positions, segments).logits ** 2)

    value, grads = jax.value_and_grad(loss)(weights)
    backward = jax.make_jaxpr(lambda w: jax.vjp(loss, w)[1](jnp.ones((), jnp.float32)))(weights)
    return value, grads, str(backward)


def test_offloaded_layer_inputs_give_plain_remat_and_go_to_host():
    value, grads, backward = _loss_and_vjp("offload")
    plain_value, plain_grads, plain_backward = _loss_and_vjp("full")
    groups = len(DeepSeekV4(_args("full"), nnx.Rngs(0)).groups)
    assert backward.count("<host>") >= groups and "<host>" not in plain_backward
    np.testing.assert_array_equal(value, plain_value)
    chex.assert_trees_all_close(grads, plain_grads, rtol=1e-6, atol=1e-9)


class _Memory:
    def __init__(self, kind):
        self.kind = kind


class _DeviceWithoutHost:
    platform = "npu"

    def addressable_memories(self):
        return [_Memory("device")]


def test_a_platform_without_host_memory_is_refused_in_one_line():
    with pytest.raises(ConfigError) as error:
        check_memory_kinds(_args("offload"), _DeviceWithoutHost())
    message = str(error.value)
    assert "config.model.remat_policy='offload'" in message and "pinned_host" in message
    assert "['device']" in message and "\n" not in message
    check_memory_kinds(_args("full"), _DeviceWithoutHost())
    check_memory_kinds(_args("offload"), jax.devices()[0])


def test_the_planner_counts_the_layer_inputs_off_the_device():
    """Offload takes every layer's [tokens, hc, d] input out of the activations, and the report's
    transfer is those bytes out and back; on a CM384 die the host link is 40 GB/s."""
    args = _args("offload")
    shape = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    tokens = 8 * 128 // 8
    inputs = (args.num_layers + args.num_mtp_layers) * tokens * args.hc_mult * args.hidden_size * 4
    assert memory.layer_input_bytes(args, 8, 128, shape) == inputs
    full = memory.activation_bytes(_args("full"), 8, 128, shape)
    assert full - memory.activation_bytes(args, 8, 128, shape) == inputs
    assert get_topology("cm384").host_bandwidth == pytest.approx(40e9)
