"""Multi-token prediction: which tokens each MTP position reads, what it is scored against, and that it
shares the main model's embedding and head. Each check fails if the alignment is off by one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import hf_mapping
from model.losses import language_model_loss, shifted_targets
from model.transformer import DeepSeekV4, ModelOutput
from tests.model_configs import tiny_args

SEQ_LEN = 48
CHANGED = 20  # the position whose token is replaced


@pytest.fixture(scope="module")
def outputs():
    args = tiny_args()
    model = DeepSeekV4(args, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (2, SEQ_LEN)).astype(np.int32)
    edited = tokens.copy()
    edited[:, CHANGED] = (edited[:, CHANGED] + 1) % args.vocab_size
    return args, model, forward(state, tokens), forward(state, edited)


def _changed_positions(a, b):
    return np.flatnonzero(np.abs(np.asarray(a) - np.asarray(b)).max(axis=(0, 2)) > 0)


def test_main_head_reads_tokens_up_to_its_position(outputs):
    _, _, before, after = outputs
    assert _changed_positions(before.logits, after.logits).min() == CHANGED


def test_mtp_position_reads_the_next_token(outputs):
    """MTP at position i combines the streams at i with the embedding of token i+1."""
    _, _, before, after = outputs
    assert _changed_positions(before.mtp_logits[0], after.mtp_logits[0]).min() == CHANGED - 1


def test_mtp_shares_embedding_and_head(outputs):
    args, model, _, _ = outputs
    mtp_vars = {p: v for p, v in hf_mapping.model_flat(model).items() if p.startswith("mtp.")}
    assert mtp_vars
    assert not [p for p, v in mtp_vars.items() if args.vocab_size in v.shape]


def test_shifted_targets():
    tokens = jnp.array([[10, 11, 12, 13, 14]])
    mask = jnp.array([[0, 1, 1, 1, 1]])
    targets, weights = shifted_targets(tokens, mask, 2)
    assert targets[0, :3].tolist() == [12, 13, 14]
    assert weights[0].tolist() == [1, 1, 1, 0, 0]
    targets, weights = shifted_targets(tokens, mask, 1)
    assert targets[0, :4].tolist() == [11, 12, 13, 14] and weights[0].tolist() == [1, 1, 1, 1, 0]


def test_mtp_loss_scores_token_two_ahead():
    """Logits that put all mass on token i+2 at position i give zero MTP loss; one position off does not."""
    vocab, seq = 16, 10
    tokens = jnp.arange(seq)[None] % vocab

    def peaked(shift):
        """Head inputs whose logits through an identity head are 50 at token i+shift, 0 elsewhere."""
        target = jnp.pad(tokens[:, shift:], ((0, 0), (0, shift)))
        return 50.0 * jax.nn.one_hot(target, vocab)

    mask = jnp.ones_like(tokens)
    for shift, expect_zero in ((2, True), (1, False), (3, False)):
        output = ModelOutput(
            logits=None,
            mtp_logits=(),
            moe=None,
            head_inputs=jnp.stack([peaked(1), peaked(shift)]),
            head=jnp.eye(vocab),
            vocab_tile=vocab // 4,
        )
        _, metrics = language_model_loss(output, tokens, mask, mtp_weight=0.3)
        assert float(metrics["main_loss"]) < 1e-6
        assert (float(metrics["mtp_loss"]) < 1e-6) == expect_zero, shift


def test_targets_stay_inside_their_document():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    _, weights = shifted_targets(tokens, jnp.ones_like(tokens), 1, segments)
    assert weights[0].tolist() == [1, 1, 0, 1, 0, 0]
    _, weights = shifted_targets(tokens, jnp.ones_like(tokens), 2, segments)
    assert weights[0].tolist() == [1, 0, 0, 0, 0, 0]
