"""Packed rows: every document is computed as if it were alone (window, CSA compressor and indexer,
HCA compressor, MTP), and the loss of a packed row equals the token-weighted loss of its documents.
Tolerance: 2e-5 of the largest logit (float32; different shapes change reduction order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.losses import language_model_loss
from model.transformer import DeepSeekV4
from tests.model_configs import parity_args

RTOL = 2e-5
# Lengths: one long enough for 2 HCA blocks and many CSA entries past top-k; a tail not multiple of 4;
# a short one inside a single window.
LENGTHS = (290, 133, 11)
ROW = 448


@pytest.fixture(scope="module")
def run():
    args = parity_args()
    graphdef, state = nnx.split(DeepSeekV4(args, nnx.Rngs(0)))
    forward = jax.jit(lambda st, t, p, s: nnx.merge(graphdef, st)(t, p, s))
    return args, forward, state


def _pack(docs, row):
    tokens, positions, segments = (np.zeros((1, row), np.int32) for _ in range(3))
    start = 0
    for i, doc in enumerate(docs, start=1):
        tokens[0, start : start + len(doc)] = doc
        positions[0, start : start + len(doc)] = np.arange(len(doc))
        segments[0, start : start + len(doc)] = i
        start += len(doc)
    return tokens, positions, segments


def test_document_alone_equals_packed(run):
    args, forward, state = run
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, args.vocab_size, n).astype(np.int32) for n in LENGTHS]
    packed = forward(state, *_pack(docs, ROW))
    start = 0
    for doc in docs:
        alone = forward(state, *_pack([doc], len(doc)))
        for ours, expected in ((packed.logits, alone.logits), (packed.mtp_logits[0], alone.mtp_logits[0])):
            got = np.asarray(ours)[0, start : start + len(doc)]
            want = np.asarray(expected)[0]
            if got.shape[0] > 1:  # MTP at a document's last position reads the next document's token
                got, want = got[:-1], want[:-1]
            error = np.abs(got - want).max() / np.abs(want).max()
            assert error < RTOL, (len(doc), error)
        start += len(doc)


def test_packed_loss_is_the_token_weighted_document_loss(run):
    args, forward, state = run
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, args.vocab_size, n).astype(np.int32) for n in (40, 25)]
    tokens, positions, segments = _pack(docs, 80)
    packed, metrics = language_model_loss(
        forward(state, tokens, positions, segments),
        jnp.asarray(tokens),
        jnp.asarray(segments > 0),
        0.0,
        jnp.asarray(segments),
    )
    total, count = 0.0, 0
    for doc in docs:
        t, p, s = _pack([doc], len(doc))
        loss, m = language_model_loss(forward(state, t, p, s), jnp.asarray(t), jnp.ones_like(t), 0.0)
        total += float(loss) * float(m["target_tokens"])
        count += float(m["target_tokens"])
    assert float(metrics["target_tokens"]) == count == sum(len(d) - 1 for d in docs)
    assert abs(float(packed) - total / count) < 1e-5
