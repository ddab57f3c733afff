"""The output head read over vocabulary tiles: log-probabilities of chosen tokens, and the reverse KL
to a teacher, without ever holding [tokens, vocab] logits.

A tile is `tile` columns of the head [d, vocab]; tile j holds the columns c * n + j (c < tile, n =
vocab / tile tiles), so a vocabulary sharded in contiguous blocks (over `tensor`) stays sharded inside
every tile. Forward: one loop over tiles keeps an online log-sum-exp (running max and sum) and the
target's logit, so each tile's logits are computed once. Backward (custom VJP): the loop runs again, recomputes each tile's logits, adds the
tile's share of the hidden gradient and emits the tile's head gradient, constrained to the head's own
sharding so that the reduction over the token shards happens tile by tile (reduce-scatter) instead of
on a whole float32 head. Each tile of the head is cast to the compute dtype before it is gathered.
Live at once: one [tokens, tile] float32 logits tile and one [d, tile] head tile, whatever the vocabulary.
Start at `token_logprobs`; `reverse_kl` is distillation's KL(student || teacher) over the full vocabulary.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mesh.sharding import constrain

HEAD_NAMES = ("embed", "vocab")
GATHERED_TILE = (None, "vocab")  # a head tile as the matmul reads it: d whole, columns as the vocabulary


def _tiles(head: jax.Array, tile: int) -> jax.Array:
    """head [d, v] -> [d, tile, n]: [:, c, j] is column c * n + j (tile j = [:, :, j])."""
    d, vocab = head.shape
    return head.reshape(d, tile, vocab // tile)


def _tile_logits(hidden: jax.Array, tiles: jax.Array, j) -> tuple:
    """hidden [..., d], tiles [d, tile, n] -> (logits of tile j [..., tile] float32, the tile [d, tile]
    in hidden's dtype)."""
    weight = constrain(lax.dynamic_index_in_dim(tiles, j, axis=2, keepdims=False).astype(hidden.dtype), GATHERED_TILE)
    return jnp.einsum("...d,dt->...t", hidden, weight, preferred_element_type=jnp.float32), weight


def _in_tile(targets: jax.Array, n: int, j, tile: int) -> jax.Array:
    """targets [...] -> one-hot [..., tile] float32 of the targets that fall in tile j (zeros elsewhere)."""
    hit = (targets % n) == j
    return jax.nn.one_hot(targets // n, tile, dtype=jnp.float32) * hit[..., None]


def _online_start(shape) -> tuple:
    """(running max, running sum of exp(logits - max)) before the first tile."""
    return jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32)


def _online_update(peak, total, logits) -> tuple:
    """Folds one tile's logits [..., tile] into (peak, total) -> (new peak, new total, the factor
    exp(peak - new peak) that rescales sums taken against the old peak, exp(logits - new peak))."""
    new_peak = jnp.maximum(peak, jnp.max(logits, axis=-1))
    scale = jnp.exp(peak - new_peak)
    weights = jnp.exp(logits - new_peak[..., None])
    return new_peak, total * scale + jnp.sum(weights, axis=-1), scale, weights


def _head_gradient(tile_gradients: jax.Array, head: jax.Array) -> jax.Array:
    """[n, d, tile] float32 -> [d, v] in head's dtype (inverse of `_tiles`)."""
    d, vocab = head.shape
    return jnp.transpose(tile_gradients, (1, 2, 0)).reshape(d, vocab).astype(head.dtype)


def _backward_tiles(hidden, tiles, head, dlogits_of):
    """Runs the tile loop backward: dlogits_of(logits [..., tile], j) -> d(loss)/d(logits) [..., tile]
    float32. -> (d hidden in hidden's dtype, d head in head's dtype)."""
    n = tiles.shape[2]

    def body(dhidden, j):
        logits, weight = _tile_logits(hidden, tiles, j)
        dlogits = dlogits_of(logits, j).astype(hidden.dtype)
        dhidden = dhidden + jnp.einsum("...t,dt->...d", dlogits, weight, preferred_element_type=jnp.float32)
        dtile = jnp.einsum("...d,...t->dt", hidden, dlogits, preferred_element_type=jnp.float32)
        return dhidden, constrain(dtile, HEAD_NAMES)

    dhidden, tile_gradients = lax.scan(body, jnp.zeros(hidden.shape, jnp.float32), jnp.arange(n))
    return dhidden.astype(hidden.dtype), _head_gradient(tile_gradients, head)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, tile: int) -> jax.Array:
    """hidden [..., d] (normalised, compute dtype), head [d, v], targets [...] int -> log p(target)
    [...] float32, logits = hidden @ head (float32 accumulation), `tile` columns at a time."""
    return _logprobs_forward(hidden, head, targets, tile)[0]


def _logprobs_forward(hidden, head, targets, tile):
    """One pass over the tiles: the target's logit and the online log-sum-exp."""
    tiles = _tiles(head, tile)
    n = tiles.shape[2]

    def body(carry, j):
        peak, total, picked = carry
        logits, _ = _tile_logits(hidden, tiles, j)
        peak, total, _, _ = _online_update(peak, total, logits)
        return (peak, total, picked + jnp.sum(logits * _in_tile(targets, n, j, tile), axis=-1)), None

    start = _online_start(hidden.shape[:-1]) + (jnp.zeros(hidden.shape[:-1], jnp.float32),)
    (peak, total, picked), _ = lax.scan(body, start, jnp.arange(n))
    lse = peak + jnp.log(total)
    return picked - lse, (hidden, head, targets, lse)


def _logprobs_backward(tile, residuals, cotangent):
    hidden, head, targets, lse = residuals
    tiles = _tiles(head, tile)
    n = tiles.shape[2]

    def dlogits_of(logits, j):
        return cotangent[..., None] * (_in_tile(targets, n, j, tile) - jnp.exp(logits - lse[..., None]))

    dhidden, dhead = _backward_tiles(hidden, tiles, head, dlogits_of)
    return dhidden, dhead, None


token_logprobs.defvjp(_logprobs_forward, _logprobs_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def reverse_kl(
    hidden: jax.Array, head: jax.Array, teacher_hidden: jax.Array, teacher_head: jax.Array, tile: int
) -> jax.Array:
    """Student hidden [..., d] and head [d, v], teacher hidden [..., d'] and head [d', v] ->
    KL(student || teacher) over the vocabulary [...] float32, `tile` columns at a time. The teacher
    gets no gradient (its cotangents are zero)."""
    return _kl_forward(hidden, head, teacher_hidden, teacher_head, tile)[0]


def _kl_forward(hidden, head, teacher_hidden, teacher_head, tile):
    """With z, y the student and teacher logits: KL = sum_v p_v (z_v - y_v) - lse(z) + lse(y), where
    sum_v p_v (z_v - y_v) = gap / total, accumulated online against the running max of z; one pass
    over the tiles for both models."""
    tiles, teacher_tiles = _tiles(head, tile), _tiles(teacher_head, tile)
    n = tiles.shape[2]

    def body(carry, j):
        peak, total, gap, teacher_peak, teacher_total = carry
        logits, _ = _tile_logits(hidden, tiles, j)
        teacher, _ = _tile_logits(teacher_hidden, teacher_tiles, j)
        peak, total, scale, weights = _online_update(peak, total, logits)
        gap = gap * scale + jnp.sum(weights * (logits - teacher), axis=-1)
        teacher_peak, teacher_total, _, _ = _online_update(teacher_peak, teacher_total, teacher)
        return (peak, total, gap, teacher_peak, teacher_total), None

    shape = hidden.shape[:-1]
    start = _online_start(shape) + (jnp.zeros(shape, jnp.float32),) + _online_start(shape)
    (peak, total, gap, teacher_peak, teacher_total), _ = lax.scan(body, start, jnp.arange(n))
    lse = peak + jnp.log(total)
    teacher_lse = teacher_peak + jnp.log(teacher_total)
    mean_gap = gap / total
    kl = mean_gap - lse + teacher_lse
    return kl, (hidden, head, teacher_hidden, teacher_head, lse, mean_gap)


def _kl_backward(tile, residuals, cotangent):
    """d KL / d z_v = p_v (z_v - y_v - sum_u p_u (z_u - y_u))."""
    hidden, head, teacher_hidden, teacher_head, lse, mean_gap = residuals
    tiles, teacher_tiles = _tiles(head, tile), _tiles(teacher_head, tile)

    def dlogits_of(logits, j):
        teacher, _ = _tile_logits(teacher_hidden, teacher_tiles, j)
        probs = jnp.exp(logits - lse[..., None])
        return cotangent[..., None] * probs * (logits - teacher - mean_gap[..., None])

    dhidden, dhead = _backward_tiles(hidden, tiles, head, dlogits_of)
    return dhidden, dhead, jnp.zeros_like(teacher_hidden), jnp.zeros_like(teacher_head)


reverse_kl.defvjp(_kl_forward, _kl_backward)
