"""The tiled expert MLP (model/grouped_mlp.py) against a row-by-row NumPy reference, forward and every
gradient: chunks that are empty, full, or end inside a tile, rows that do not fill the last tile,
several chunks per expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.grouped_mlp import chunk_tile, expert_mlp, occupied_tiles, tile_flops

CHUNKS, ROWS, WIDTH, HIDDEN, EXPERTS, TILE = 6, 10, 8, 12, 3, 4
COUNTS = np.array([0, 3, 10, 4, 7, 1], np.int32)  # ROWS is not a multiple of TILE
LIMIT = 0.8  # the clamp is active for some rows


def numpy_reference(x, weights, w1, w3, w2, chunks_per_expert):
    """Row by row: rows below their chunk's count get weight * clamped_swiglu(x@w1, x@w3) @ w2."""
    y = np.zeros(x.shape, np.float64)
    for chunk in range(CHUNKS):
        e = chunk // chunks_per_expert
        for row in range(COUNTS[chunk]):
            gate, up = x[chunk, row] @ w1[e], x[chunk, row] @ w3[e]
            gate = np.minimum(gate, LIMIT)
            up = np.clip(up, -LIMIT, LIMIT)
            h = gate / (1 + np.exp(-gate)) * up * weights[chunk, row]
            y[chunk, row] = h @ w2[e]
    return y


def problem(chunks_per_expert):
    rng = np.random.default_rng(chunks_per_expert)
    experts = CHUNKS // chunks_per_expert
    return dict(
        x=rng.normal(size=(CHUNKS, ROWS, WIDTH)),
        weights=rng.uniform(0.1, 1, size=(CHUNKS, ROWS)),
        w1=rng.normal(size=(experts, WIDTH, HIDDEN)) * 0.4,
        w3=rng.normal(size=(experts, WIDTH, HIDDEN)) * 0.4,
        w2=rng.normal(size=(experts, HIDDEN, WIDTH)) * 0.4,
        dy=rng.normal(size=(CHUNKS, ROWS, WIDTH)),
    )


@pytest.mark.parametrize("chunks_per_expert", [1, 2])
def test_forward_and_gradients_match_numpy(chunks_per_expert):
    p = problem(chunks_per_expert)
    names = ("x", "weights", "w1", "w3", "w2")
    args = [jnp.asarray(p[name], jnp.float32) for name in names]

    def loss(*a):
        y = expert_mlp(
            a[0], a[1], jnp.asarray(COUNTS), *a[2:], chunks_per_expert=chunks_per_expert, tile=TILE, limit=LIMIT
        )
        return jnp.sum(y * p["dy"]), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(*args)
    np.testing.assert_allclose(y, numpy_reference(*(p[n] for n in names), chunks_per_expert), rtol=1e-5, atol=1e-5)
    # Gradients by central differences of the float64 reference along random directions.
    rng = np.random.default_rng(7)
    objective = lambda q: np.sum(numpy_reference(*(q[n] for n in names), chunks_per_expert) * p["dy"])
    for name, grad in zip(names, grads):
        direction = rng.normal(size=p[name].shape)
        step = 1e-5
        plus, minus = dict(p), dict(p)
        plus[name], minus[name] = p[name] + step * direction, p[name] - step * direction
        numeric = (objective(plus) - objective(minus)) / (2 * step)
        assert float(jnp.sum(grad * direction)) == pytest.approx(numeric, rel=1e-4, abs=1e-4), name
    # Rows past a chunk's count neither produce output nor receive gradient.
    past = np.arange(ROWS)[None, :] >= COUNTS[:, None]
    assert np.all(np.asarray(y)[past] == 0) and np.all(np.asarray(grads[0])[past] == 0)


def test_tiles_run_and_their_flops():
    assert int(occupied_tiles(jnp.asarray(COUNTS), TILE)) == 0 + 1 + 3 + 1 + 2 + 1
    # Sizes where the matmuls dominate the elementwise SwiGLU, so a recomputed projection would show.
    tile, width, hidden = 16, 64, 64
    forward, backward = tile_flops(tile, width, hidden, jnp.float32, LIMIT)
    matmuls = 2 * tile * width * hidden
    assert 3 * matmuls <= forward < 4 * matmuls  # three matmuls + the elementwise swiglu
    # Six gradient matmuls + the swiglu's derivative; recomputing gate/up would add two more.
    assert 6 * matmuls <= backward < 7 * matmuls


@pytest.mark.parametrize(
    "rows,tile,expected", [(80, 128, 80), (300, 128, 100), (256, 128, 128), (10, 4, 4), (9, 4, 3), (1, 16, 1)]
)
def test_chunk_tile_covers_a_chunk_in_as_few_tiles_with_least_padding(rows, tile, expected):
    """As many tiles as `tile` needs (ceil(rows / tile)), each no longer than covers the chunk."""
    got = chunk_tile(rows, tile)
    assert got == expected
    tiles = -(-rows // tile)
    assert -(-rows // got) == tiles and got <= tile and tiles * got - rows < tiles
