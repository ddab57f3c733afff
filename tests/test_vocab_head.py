"""The head read over vocabulary tiles (model/vocab_head.py) against NumPy on whole logits, on one
device and on 8 emulated devices with the head sharded as the model shards it (d over fsdp, vocab
over tensor) and the tokens over data x fsdp: value and gradients of the hidden states and the head,
and no [tokens, vocab] float32 buffer in the compiled program (which the whole-vocabulary tile has,
so the check can fail)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from configs.parallelism import RULES
from mesh.sharding import activate
from model.vocab_head import reverse_kl, token_logprobs

H, B, S, D, V = 2, 4, 64, 64, 256  # more local tokens than d, as at full size
MESH_NAMES = ("data", "fsdp", "expert", "tensor")
MESHES = {"none": None, "data2_fsdp2_tensor2": (2, 2, 1, 2), "fsdp4_tensor2": (1, 4, 1, 2)}
TOKEN_SPEC = PartitionSpec(None, ("data", "fsdp"))  # [h, b, s, d]: rows over data x fsdp
HEAD_SPEC = PartitionSpec(("fsdp", "expert"), "tensor")  # what RULES give ("embed", "vocab")


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        hidden=rng.normal(size=(H, B, S, D)),
        head=rng.normal(size=(D, V)) / np.sqrt(D),
        teacher_hidden=rng.normal(size=(H, B, S, D)),
        teacher_head=rng.normal(size=(D, V)) / np.sqrt(D),
        targets=rng.integers(0, V, size=(H, B, S)),
        cotangent=rng.normal(size=(H, B, S)),
    )


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_reference(p):
    """float64: (log-probs, their gradients (hidden, head) of sum(cotangent * log-probs), reverse KL,
    its gradients), from whole logits."""
    logits = p["hidden"] @ p["head"]
    logp = _log_softmax(logits)
    teacher = _log_softmax(p["teacher_hidden"] @ p["teacher_head"])
    one_hot = np.eye(V)[p["targets"]]
    picked = np.sum(logp * one_hot, -1)
    g = p["cotangent"][..., None]
    d_logits = g * (one_hot - np.exp(logp))
    probs = np.exp(logp)
    kl = np.sum(probs * (logp - teacher), -1)
    d_kl = g * probs * (logp - teacher - kl[..., None])
    through = lambda d: (d @ p["head"].T, np.einsum("hbsd,hbsv->dv", p["hidden"], d))
    return picked, through(d_logits), kl, through(d_kl)


def _run(p, mesh_shape, tile):
    """(log-probs, grads, KL, grads) from the tiled functions, float32, and the compiled program's HLO.
    Every array is an argument (a closed-over one would be compiled in as a constant)."""
    names = ("hidden", "head", "teacher_hidden", "teacher_head", "cotangent", "targets")
    inputs = [jnp.asarray(p[k], jnp.int32 if k == "targets" else jnp.float32) for k in names]

    def both(hidden, head, teacher_hidden, teacher_head, cotangent, targets):
        def losses(hidden, head):
            return (
                token_logprobs(hidden, head, targets, tile),
                reverse_kl(hidden, head, teacher_hidden, teacher_head, tile),
            )

        (picked, kl), vjp = jax.vjp(losses, hidden, head)
        return picked, vjp((cotangent, jnp.zeros_like(kl))), kl, vjp((jnp.zeros_like(picked), cotangent))

    if mesh_shape is None:
        compiled = jax.jit(both).lower(*inputs).compile()
        return compiled(*inputs), compiled.as_text()
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(mesh_shape), MESH_NAMES)
    specs = (TOKEN_SPEC, HEAD_SPEC, TOKEN_SPEC, HEAD_SPEC, TOKEN_SPEC, TOKEN_SPEC)
    inputs = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(inputs, specs)]
    with activate(mesh, RULES):
        compiled = jax.jit(both).lower(*inputs).compile()
        return compiled(*inputs), compiled.as_text()


def _close(ours, expected, what):
    np.testing.assert_allclose(
        np.asarray(ours, np.float64), expected, rtol=1e-5, atol=1e-5 * max(np.abs(expected).max(), 1e-6), err_msg=what
    )


def _largest_float32_buffer(hlo: str) -> int:
    return max(int(np.prod([int(n) for n in dims.split(",")])) for dims in re.findall(r"f32\[([0-9,]+)\]", hlo))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("tile", [V // 4, V // 16])
def test_tiled_head_equals_whole_logits(mesh_name, tile):
    p = _problem()
    picked, picked_grads, kl, kl_grads = _numpy_reference(p)
    (ours_picked, ours_picked_grads, ours_kl, ours_kl_grads), hlo = _run(p, MESHES[mesh_name], tile)
    _close(ours_picked, picked, "log-probs")
    _close(ours_kl, kl, "reverse KL")
    for what, ours, expected in (("log-prob", ours_picked_grads, picked_grads), ("KL", ours_kl_grads, kl_grads)):
        _close(ours[0], expected[0], f"{what} gradient of the hidden states")
        _close(ours[1], expected[1], f"{what} gradient of the head")


@pytest.mark.parametrize("mesh_name", ["none", "data2_fsdp2_tensor2"])
def test_no_tokens_by_vocabulary_buffer_is_compiled(mesh_name):
    """Per device, the largest float32 array of the tiled program is a logits tile; the one-tile
    program (the whole vocabulary) holds [tokens, vocab] logits, so the bound is a real one."""
    shape = MESHES[mesh_name]
    token_shards = 1 if shape is None else shape[0] * shape[1]
    vocab_shards = 1 if shape is None else shape[3]
    whole_logits = H * B * S // token_shards * V // vocab_shards
    _, tiled = _run(_problem(), shape, V // 4)
    _, whole = _run(_problem(), shape, V)
    assert _largest_float32_buffer(tiled) < whole_logits
    assert _largest_float32_buffer(whole) >= whole_logits
