"""The lightning indexer selects exactly index_topk visible entries per query, ties going to the
lowest index, against a NumPy selection written separately; scores that tie at 0 (every indexer
head's dot product negative, common with few heads) used to select every tied entry."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.indexer import Indexer, top_k_mask
from tests.model_configs import tiny_args


def numpy_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Exactly k per row: by score descending, then index ascending (a stable sort of -score)."""
    order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def test_top_k_mask_breaks_ties_by_lowest_index():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(3, 5, 12)).astype(np.float32)  # many ties
    scores[0, 0] = 0.0  # a whole row tied
    for k in (1, 4, 12):
        mask = np.asarray(top_k_mask(jnp.asarray(scores), k))
        np.testing.assert_array_equal(mask, numpy_top_k(scores, k))
        assert (mask.sum(-1) == k).all()


def test_an_all_tied_index_attends_exactly_k_visible_entries():
    """wq_b = 0 makes every score relu(0) = 0: each query keeps its k lowest-index visible entries."""
    args = tiny_args(index_topk=3)
    indexer = Indexer(args, 4, nnx.Rngs(0))
    indexer.wq_b[...] = jnp.zeros_like(indexer.wq_b[...])
    b, s = 2, 64
    n = s // 4
    rng = np.random.default_rng(1)
    u = jnp.asarray(rng.normal(size=(b, s, args.hidden_size)), jnp.float32)
    q_latent = jnp.asarray(rng.normal(size=(b, s, args.q_lora_rank)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    segment_ids = jnp.ones((b, s), jnp.int32)
    visible = (jnp.arange(n)[None, None, :] * 4 + 3) < positions[..., None]  # entries complete before t
    selected = np.asarray(jax.jit(indexer)(u, q_latent, positions, segment_ids, visible)[0])
    visible = np.asarray(visible)
    expected = visible & (np.cumsum(visible, axis=-1) <= args.index_topk)
    np.testing.assert_array_equal(selected, expected)
    assert selected.sum(-1).max() == args.index_topk
