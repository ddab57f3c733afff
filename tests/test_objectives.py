"""The DPO, GRPO and distillation losses and their gradients against NumPy written from the formulas.

The references work per token in float64 on whole logits = hidden @ head: log-softmax, the scored
positions (position i scores token i+1 when it is in the loss mask and in the same segment),
per-sequence sums, and the analytic gradient of each loss with respect to the logits, carried to the
hidden states and the head by the chain rule. The objectives read the head over vocabulary tiles
(model/vocab_head.py); every test runs with the whole vocabulary as one tile and with 4 tiles.
Tolerance: 1e-5 relative for losses, 1e-5 of the largest gradient entry for gradients (float32
against float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data.rollouts import group_advantages
from model.transformer import ModelOutput
from objectives.distill import Distill
from objectives.dpo import DPO
from objectives.grpo import GRPO
from objectives.sft import MTP_WEIGHT, SFT

B, S, V, D = 4, 12, 8, 5
TILES = [V, V // 4]  # the whole vocabulary in one tile; four tiles


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _scored(tokens, mask, segments):
    """(row, position) pairs that score the next token."""
    return [
        (b, i)
        for b in range(tokens.shape[0])
        for i in range(tokens.shape[1] - 1)
        if mask[b, i + 1] and segments[b, i] > 0 and segments[b, i] == segments[b, i + 1]
    ]


def _head(rng):
    """(hidden [B, S, D], head [D, V]) whose logits hidden @ head are O(1)."""
    return rng.normal(size=(B, S, D)), rng.normal(size=(D, V)) / np.sqrt(D)


def _logits(hidden, head):
    return np.einsum("bsd,dv->bsv", hidden, head)


def _through_head(grad_logits, hidden, head):
    """d loss / d logits -> (d loss / d hidden, d loss / d head), as logits = hidden @ head."""
    return grad_logits @ head.T, np.einsum("bsd,bsv->dv", hidden, grad_logits)


def _output(hidden, head, tile):
    return ModelOutput(
        logits=None,
        mtp_logits=(),
        moe=None,
        head_inputs=jnp.asarray(hidden, jnp.float32)[None],
        head=jnp.asarray(head, jnp.float32),
        vocab_tile=tile,
    )


def _value_and_grads(loss, hidden, head):
    """loss(hidden, head) -> ((value, aux), (d hidden, d head)) in float32."""
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(hidden, jnp.float32), jnp.asarray(head, jnp.float32)
    )


def _close_grads(ours, grad_logits, hidden, head):
    for what, got, expected in zip(("hidden", "head"), ours, _through_head(grad_logits, hidden, head)):
        _close(got, expected, f"gradient of the {what}")


def _close(ours, reference, what):
    np.testing.assert_allclose(
        np.asarray(ours, np.float64), reference, rtol=1e-5, atol=1e-5 * max(np.abs(reference).max(), 1e-6), err_msg=what
    )


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
            segments[b, c : c + r] = 2
            mask[b, c + 2 : c + r] = 1
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


@pytest.mark.parametrize("tile", TILES)
def test_dpo_loss_and_gradient_match_numpy(tile):
    rng = np.random.default_rng(0)
    batch = _preference_batch(rng)
    (hidden, head), reference = _head(rng), _head(rng)
    dpo = DPO(beta=0.3, bias_update_rate=0.0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    pairs = dpo.normalisers(jbatch, 0)
    expected_loss, expected_margin, expected_grad, expected_pairs = _dpo_reference(
        _logits(hidden, head), _logits(*reference), batch, 0.3
    )
    assert float(pairs) == expected_pairs == 3

    def loss(hidden, head):
        return dpo.loss(_output(hidden, head, tile), jbatch, _output(*reference, tile), pairs, {})

    (value, metrics), grads = _value_and_grads(loss, hidden, head)
    _close(value, expected_loss, "loss")
    _close(metrics["dpo_margin"], expected_margin, "margin")
    _close_grads(grads, expected_grad, hidden, head)


def test_dpo_loss_is_log_two_when_policy_is_the_reference():
    rng = np.random.default_rng(1)
    batch = {k: jnp.asarray(v) for k, v in _preference_batch(rng).items()}
    policy = _output(*_head(rng), V // 4)
    dpo = DPO(beta=0.1, bias_update_rate=0.0)
    value, metrics = dpo.loss(policy, batch, policy, dpo.normalisers(batch, 0), {})
    np.testing.assert_allclose(float(value), np.log(2.0), rtol=1e-6)
    assert float(metrics["dpo_accuracy"]) == 0.0


def _completion_batch(rng):
    """Rows: prompt of 3 tokens then a completion of varying length, one or two packed segments."""
    tokens = rng.integers(0, V, (B, S)).astype(np.int32)
    segments, mask = np.zeros((B, S), np.int32), np.zeros((B, S), np.int32)
    for b, (start, end) in enumerate([(0, 9), (0, 12), (0, 5), (0, 7)]):
        segments[b, start:end] = 1
        mask[b, start + 3 : end] = 1
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


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_grpo_loss_and_gradient_match_numpy(kl_coef, tile):
    rng = np.random.default_rng(2)
    batch = _completion_batch(rng)
    (hidden, head), reference = _head(rng), _head(rng)
    logits = _logits(hidden, head)
    # Sampling log-probs near the policy's so that some ratios fall inside the clip range and some outside.
    own = np.take_along_axis(_log_softmax(logits), np.roll(batch["tokens"], -1, 1)[..., None], -1)[..., 0]
    sampling = np.roll(own, 1, 1) + rng.normal(scale=0.3, size=(B, S))
    advantages = np.repeat(rng.normal(size=(B, 1)), S, 1)
    grpo = GRPO(clip_low=0.2, clip_high=0.28, kl_coef=kl_coef, bias_update_rate=0.0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    jbatch.update(sampling_logprobs=jnp.asarray(sampling, jnp.float32), advantages=jnp.asarray(advantages, jnp.float32))
    tokens = grpo.normalisers(jbatch, 0)
    expected_loss, expected_grad, count = _grpo_reference(
        logits, _logits(*reference), batch, sampling, advantages, 0.2, 0.28, kl_coef
    )
    assert float(tokens) == count

    def loss(hidden, head):
        reference_output = _output(*reference, tile) if kl_coef else None
        return grpo.loss(_output(hidden, head, tile), jbatch, reference_output, tokens, {})

    (value, metrics), grads = _value_and_grads(loss, hidden, head)
    _close(value, expected_loss, "loss")
    _close_grads(grads, expected_grad, hidden, head)
    assert 0.0 < float(metrics["grpo_clipped"]) < 1.0  # both branches exercised


def test_group_advantages_normalise_within_groups():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 2.0, 0.0])
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    advantages = group_advantages(rewards, groups, eps=1e-6)
    np.testing.assert_allclose(advantages[:4], [1, -1, -1, 1], rtol=1e-5)
    np.testing.assert_array_equal(advantages[4:8], 0.0)  # equal rewards: nothing to prefer
    np.testing.assert_allclose(advantages[8:], [1, -1], rtol=1e-5)


@pytest.mark.parametrize("tile", TILES)
def test_reverse_kl_loss_and_gradient_match_numpy(tile):
    rng = np.random.default_rng(3)
    batch = _completion_batch(rng)
    (hidden, head), teacher = _head(rng), _head(rng)
    ls, lt = _log_softmax(_logits(hidden, head)), _log_softmax(_logits(*teacher))
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
    (value, _), grads = _value_and_grads(
        lambda hidden, head: distill.loss(_output(hidden, head, tile), jbatch, _output(*teacher, tile), tokens, {}),
        hidden,
        head,
    )
    _close(value, expected, "reverse KL")
    _close_grads(grads, expected_grad, hidden, head)


@pytest.mark.parametrize("tile", TILES)
def test_sft_with_mtp_loss_and_gradient_match_numpy(tile):
    """Main and MTP heads through the one shared head: the mean next-token loss plus 0.3 x the mean
    loss two tokens ahead, and the gradients of both heads' inputs and of the head they share."""
    rng = np.random.default_rng(4)
    batch = _completion_batch(rng)
    hidden, head = rng.normal(size=(2, B, S, D)), rng.normal(size=(D, V)) / np.sqrt(D)
    tokens, mask, segments = batch["tokens"], batch["loss_mask"], batch["segment_ids"]
    expected, grad_logits = 0.0, np.zeros((2, B, S, V))
    for depth, weight in ((0, 1.0), (1, 0.3)):
        shift = depth + 1
        logp = _log_softmax(_logits(hidden[depth], head))
        scored = [
            (b, i)
            for b in range(B)
            for i in range(S - shift)
            if mask[b, i + shift] and segments[b, i + shift] == segments[b, i]
        ]
        for b, i in scored:
            target = tokens[b, i + shift]
            expected -= weight * logp[b, i, target] / len(scored)
            grad_logits[depth, b, i] = -weight * (np.eye(V)[target] - np.exp(logp[b, i])) / len(scored)
    sft = SFT(mtp_weight=optax.constant_schedule(0.3), bias_update_rate=0.0)
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    counts = sft.normalisers(jbatch, 1)

    def loss(hidden, head):
        output = ModelOutput(logits=None, mtp_logits=(), moe=None, head_inputs=hidden, head=head, vocab_tile=tile)
        return sft.loss(output, jbatch, None, counts, {MTP_WEIGHT: 0.3})

    (value, _), (d_hidden, d_head) = _value_and_grads(loss, hidden, head)
    _close(value, expected, "loss")
    for depth in range(2):
        _close(d_hidden[depth], grad_logits[depth] @ head.T, f"gradient of head input {depth}")
    _close(d_head, np.einsum("hbsd,hbsv->dv", hidden, grad_logits), "gradient of the shared head")
