"""The merged-block array writer: merging against a painted reference, and what it writes read back
by Orbax's own ArrayHandler (values bitwise, chunks the saving mesh's shards) onto other meshes."""

import itertools

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from trainer.array_writer import BlockArrayHandler, _host_fragments, _owned_shards, merge_fragments


def _grid(shape, cuts):
    """All boxes of the grid that `cuts` (inner cut points per dimension) make of `shape`."""
    edges = [[0, *c, n] for c, n in zip(cuts, shape)]
    return [
        tuple(zip(starts, stops))
        for starts, stops in zip(
            itertools.product(*[e[:-1] for e in edges]), itertools.product(*[e[1:] for e in edges])
        )
    ]


def _paint(shape, fragments):
    """-> (values, how many fragments cover each element) of `fragments` painted into `shape`."""
    values, cover = np.zeros(shape), np.zeros(shape, int)
    for bounds, data in fragments:
        box = tuple(slice(*b) for b in bounds)
        assert data.shape == tuple(b - a for a, b in bounds)
        values[box] = data
        cover[box] += 1
    return values, cover


def _fragments(array, boxes):
    return [(box, array[tuple(slice(*b) for b in box)]) for box in boxes]


@pytest.mark.parametrize(
    "shape,cuts", [((6, 8, 4), ([2, 3], [4], [1, 2, 3])), ((16,), ([4, 8, 12],)), ((5, 7), ([1], [2, 3, 6]))]
)
def test_a_full_grid_in_any_order_becomes_one_block(shape, cuts):
    rng = np.random.default_rng(0)
    array = rng.standard_normal(shape)
    boxes = _grid(shape, cuts)
    rng.shuffle(boxes)
    merged = merge_fragments(_fragments(array, boxes))
    assert len(merged) == 1
    np.testing.assert_array_equal(merged[0][1], array)
    assert merged[0][0] == tuple((0, n) for n in shape)


def test_what_cannot_be_one_box_stays_two_boxes_with_every_value():
    array = np.arange(36.0).reshape(6, 6)
    boxes = _grid(array.shape, ([2, 4], [2, 4]))
    l_shape = [b for b in boxes if not (b[0][0] >= 2 and b[1][0] >= 2)]  # 5 tiles: top row + left column
    apart = [((0, 2), (0, 2)), ((4, 6), (4, 6))]  # diagonal tiles touch nowhere
    for chosen, expected_blocks in ((l_shape, 2), (apart, 2)):
        merged = merge_fragments(_fragments(array, chosen))
        assert len(merged) == expected_blocks
        values, cover = _paint(array.shape, merged)
        _, expected_cover = _paint(array.shape, _fragments(array, chosen))
        np.testing.assert_array_equal(cover, expected_cover)
        np.testing.assert_array_equal(values[cover == 1], array[cover == 1])


@pytest.mark.parametrize("spec", [("a", "b"), ("a", None), (None, None), ("b", "a")])
def test_a_process_writes_one_host_copy_per_array(spec):
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    host = np.arange(8 * 48, dtype=np.float32).reshape(8, 48)
    array = jax.device_put(host, jax.NamedSharding(mesh, jax.P(*spec)))
    fragments = _host_fragments(array, _owned_shards(array, replica_id=0))
    assert len(fragments) == len({str(s.index) for s in array.addressable_shards})  # one replica of each
    merged = merge_fragments(fragments)
    assert len(merged) == 1
    np.testing.assert_array_equal(merged[0][1], host)
    assert all(data.base is None for _, data in fragments)  # copies, not views of donated buffers


def _save(directory, tree):
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, BlockArrayHandler()))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as checkpointer:
        checkpointer.save(directory, tree)


@pytest.mark.parametrize("target", [("a", None, None), (None, "b", "a"), (None, None, None)])
def test_written_blocks_restore_with_orbax_own_handler_onto_other_meshes(tmp_path, target):
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    rng = np.random.default_rng(1)
    host = {
        "w": rng.standard_normal((8, 12, 4)).astype(np.float32),
        "b": rng.standard_normal((12,)).astype(jax.numpy.bfloat16),
        "step": np.array(7, np.int32),
    }
    specs = {"w": jax.P("b", "a"), "b": jax.P("b"), "step": jax.P()}
    tree = {k: jax.device_put(v, jax.NamedSharding(mesh, specs[k])) for k, v in host.items()}
    _save(tmp_path / "ck", tree)

    stored = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path / 'ck'}", "path": "w"}}
    ).result()
    assert tuple(stored.chunk_layout.read_chunk.shape) == tree["w"].sharding.shard_shape((8, 12, 4))

    other = jax.make_mesh((4, 2), ("a", "b"), devices=jax.devices()[::-1])
    targets = {"w": jax.P(*target), "b": jax.P(target[1]), "step": jax.P()}
    restore_args = {k: ocp.ArrayRestoreArgs(sharding=jax.NamedSharding(other, targets[k])) for k in host}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(tmp_path / "ck", args=ocp.args.PyTreeRestore(restore_args=restore_args))
    for name, value in host.items():
        assert restored[name].sharding.spec == targets[name]
        assert restored[name].dtype == value.dtype
        np.testing.assert_array_equal(np.asarray(restored[name]), value)


def test_typed_prng_keys_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="rng.*key_data"):
        _save(tmp_path / "ck", {"rng": jax.random.key(0)})
