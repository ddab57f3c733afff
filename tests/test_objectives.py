"""The DPO, GRPO and distillation losses and their gradients against NumPy written from the formulas.

The references work per token in float64: log-softmax, the scored positions (position i scores token
i+1 when it is in the loss mask and in the same segment), per-sequence sums, and the analytic gradient
of each loss with respect to the logits. Tolerance: 1e-5 relative for losses, 1e-5 of the largest
gradient entry for gradients (float32 against float64)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives.distill import Distill
from objectives.dpo import DPO
from objectives.grpo import GRPO, group_advantages

B, S, V = 4, 12, 7


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _scored(tokens, mask, segments):
    """(row, position) pairs that score the next token."""
    return [(b, i) for b in range(tokens.shape[0]) for i in range(tokens.shape[1] - 1)
            if mask[b, i + 1] and segments[b, i] > 0 and segments[b, i] == segments[b, i + 1]]


def _output(logits):
    return types.SimpleNamespace(logits=jnp.asarray(logits, jnp.float32))


def _close(ours, reference, what):
    np.testing.assert_allclose(np.asarray(ours, np.float64), reference, rtol=1e-5,
                               atol=1e-5 * max(np.abs(reference).max(), 1e-6), err_msg=what)


def _preference_batch(rng):
    """One pair per row: segment 1 = prompt + chosen, segment 2 = prompt + rejected, padding; replies masked in.
    Row 3 has no rejected reply (not a pair)."""
    tokens = rng.integers(0, V, (B, S)).astype(np.int32)
    segments, mask = np.zeros((B, S), np.int32), np.zeros((B, S), np.int32)
    layout = [(5, 6), (4, 5), (6, 6), (7, 0)]  # (chosen length, rejected length); prompt = 2 tokens
    for b, (c, r) in enumerate(layout):
        segments[b, :c] = 1
        mask[b, 2:c] = 1
        if r:
            segments[b, c:c + r] = 2
            mask[b, c + 2:c + r] = 1
    positions = np.zeros_like(tokens)
    return {"tokens": tokens, "loss_mask": mask, "segment_ids": segments, "positions": positions}


def _dpo_reference(policy_logits, reference_logits, batch, beta):
    tokens, mask, segments = batch["tokens"], batch["loss_mask"], batch["segment_ids"]
    lp, lr = _log_softmax(policy_logits.astype(np.float64)), _log_softmax(reference_logits.astype(np.float64))
    sums = np.zeros((B, 2, 2))  # row, (policy, reference), (chosen, rejected)
    counts = np.zeros((B, 2))
    for b, i in _scored(tokens, mask, segments):
        side = segments[b, i] - 1
        sums[b, 0, side] += lp[b, i, tokens[b, i + 1]]
        sums[b, 1, side] += lr[b, i, tokens[b, i + 1]]
        counts[b, side] += 1
    valid = (counts > 0).all(-1)
    margin = beta * ((sums[:, 0, 0] - sums[:, 0, 1]) - (sums[:, 1, 0] - sums[:, 1, 1]))
    pairs = valid.sum()
    loss = np.sum(np.logaddexp(0.0, -margin) * valid) / pairs
    # d loss / d margin = -sigmoid(-margin) / pairs; d margin / d log p(token) = +-beta.
    grad = np.zeros_like(lp)
    softmax = np.exp(lp)
    for b, i in _scored(tokens, mask, segments):
        if not valid[b]:
            continue
        sign = 1.0 if segments[b, i] == 1 else -1.0
        d_logp = -1.0 / (1.0 + np.exp(margin[b])) / pairs * beta * sign
        grad[b, i] += d_logp * (np.eye(V)[tokens[b, i + 1]] - softmax[b, i])
    return loss, margin[valid].mean(), grad, pairs


def test_dpo_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    batch = _preference_batch(rng)
    policy, reference = rng.normal(size=(B, S, V)), rng.normal(size=(B, S, V))
    dpo = DPO(beta=0.3, bias_update_rate=0.0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    pairs = dpo.normalisers(jbatch, 0)
    expected_loss, expected_margin, expected_grad, expected_pairs = _dpo_reference(policy, reference, batch, 0.3)
    assert float(pairs) == expected_pairs == 3

    def loss(logits):
        return dpo.loss(_output(logits), jbatch, _output(reference), pairs)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(policy, jnp.float32))
    _close(value, expected_loss, "loss")
    _close(metrics["dpo_margin"], expected_margin, "margin")
    _close(grad, expected_grad, "gradient")


def test_dpo_loss_is_log_two_when_policy_is_the_reference():
    rng = np.random.default_rng(1)
    batch = {k: jnp.asarray(v) for k, v in _preference_batch(rng).items()}
    logits = rng.normal(size=(B, S, V))
    dpo = DPO(beta=0.1, bias_update_rate=0.0)
    value, metrics = dpo.loss(_output(logits), batch, _output(logits), dpo.normalisers(batch, 0))
    np.testing.assert_allclose(float(value), np.log(2.0), rtol=1e-6)
    assert float(metrics["dpo_accuracy"]) == 0.0


def _completion_batch(rng):
    """Rows: prompt of 3 tokens then a completion of varying length, one or two packed segments."""
    tokens = rng.integers(0, V, (B, S)).astype(np.int32)
    segments, mask = np.zeros((B, S), np.int32), np.zeros((B, S), np.int32)
    for b, (start, end) in enumerate([(0, 9), (0, 12), (0, 5), (0, 7)]):
        segments[b, start:end] = 1
        mask[b, start + 3:end] = 1
    segments[2, 5:11], mask[2, 8:11] = 2, 1  # a second document packed behind the first
    return {"tokens": tokens, "loss_mask": mask, "segment_ids": segments, "positions": np.zeros_like(tokens)}


def _grpo_reference(logits, reference_logits, batch, sampling, advantages, clip_low, clip_high, kl_coef):
    tokens = batch["tokens"]
    lp, lr = _log_softmax(logits.astype(np.float64)), _log_softmax(reference_logits.astype(np.float64))
    scored = _scored(tokens, batch["loss_mask"], batch["segment_ids"])
    total, grad = 0.0, np.zeros_like(lp)
    for b, i in scored:
        target = tokens[b, i + 1]
        logp, ref, old, adv = lp[b, i, target], lr[b, i, target], sampling[b, i + 1], advantages[b, i + 1]
        ratio = np.exp(logp - old)
        unclipped, clipped = ratio * adv, np.clip(ratio, 1 - clip_low, 1 + clip_high) * adv
        k3 = np.exp(ref - logp) - (ref - logp) - 1
        total += -min(unclipped, clipped) + kl_coef * k3
        d_surrogate = ratio * adv if unclipped <= clipped else 0.0
        d_logp = -d_surrogate + kl_coef * (1.0 - np.exp(ref - logp))
        grad[b, i] += d_logp * (np.eye(V)[target] - np.exp(lp[b, i]))
    return total / len(scored), grad / len(scored), len(scored)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_grpo_loss_and_gradient_match_numpy(kl_coef):
    rng = np.random.default_rng(2)
    batch = _completion_batch(rng)
    logits, reference = rng.normal(size=(B, S, V)), rng.normal(size=(B, S, V))
    # Sampling log-probs near the policy's so that some ratios fall inside the clip range and some outside.
    own = np.take_along_axis(_log_softmax(logits), np.roll(batch["tokens"], -1, 1)[..., None], -1)[..., 0]
    sampling = np.roll(own, 1, 1) + rng.normal(scale=0.3, size=(B, S))
    advantages = np.repeat(rng.normal(size=(B, 1)), S, 1)
    grpo = GRPO(clip_low=0.2, clip_high=0.28, kl_coef=kl_coef, bias_update_rate=0.0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    jbatch.update(sampling_logprobs=jnp.asarray(sampling, jnp.float32), advantages=jnp.asarray(advantages, jnp.float32))
    tokens = grpo.normalisers(jbatch, 0)
    expected_loss, expected_grad, count = _grpo_reference(logits, reference, batch, sampling, advantages,
                                                          0.2, 0.28, kl_coef)
    assert float(tokens) == count

    def loss(x):
        return grpo.loss(_output(x), jbatch, _output(reference) if kl_coef else None, tokens)

    (value, metrics), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logits, jnp.float32))
    _close(value, expected_loss, "loss")
    _close(grad, expected_grad, "gradient")
    assert 0.0 < float(metrics["grpo_clipped"]) < 1.0  # both branches exercised


def test_group_advantages_normalise_within_groups():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 2.0, 0.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    advantages = group_advantages(rewards, groups, eps=1e-6)
    np.testing.assert_allclose(advantages[:4], [1, -1, -1, 1], rtol=1e-5)
    np.testing.assert_array_equal(advantages[4:8], 0.0)  # equal rewards: nothing to prefer
    np.testing.assert_allclose(advantages[8:], [1, -1], rtol=1e-5)


def test_reverse_kl_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(3)
    batch = _completion_batch(rng)
    student, teacher = rng.normal(size=(B, S, V)), rng.normal(size=(B, S, V))
    ls, lt = _log_softmax(student), _log_softmax(teacher)
    scored = _scored(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
    expected, expected_grad = 0.0, np.zeros_like(ls)
    for b, i in scored:
        p = np.exp(ls[b, i])
        kl = np.sum(p * (ls[b, i] - lt[b, i]))
        expected += kl
        expected_grad[b, i] = p * (ls[b, i] - lt[b, i] - kl)
    expected, expected_grad = expected / len(scored), expected_grad / len(scored)
    distill = Distill(bias_update_rate=0.0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    tokens = distill.normalisers(jbatch, 0)
    (value, _), grad = jax.value_and_grad(lambda x: distill.loss(_output(x), jbatch, _output(teacher), tokens),
                                          has_aux=True)(jnp.asarray(student, jnp.float32))
    _close(value, expected, "reverse KL")
    _close(grad, expected_grad, "gradient")
