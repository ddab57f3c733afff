"""Writes a checkpoint's jax.Arrays as each process's contiguous blocks: what an async save costs.

Orbax's ArrayHandler writes every unique shard as its own TensorStore write; this handler joins the
shards a process owns into contiguous blocks and issues all block writes as one batch, far less
per-save Python work (docs/benchmarks.md). Invariants: what lands on disk is Orbax's own layout, so the
stock ArrayHandler (inherited here) restores it onto any mesh; the sharding file is not written, since
every restore here passes the target shardings; the blocks are host copies made while `save` blocks
the loop, so donated device buffers may be reused at once. Design notes: docs/training.md.
"""

import numpy as np
import jax
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint._src.multihost import multihost
from orbax.checkpoint._src.serialization import ocdbt_utils
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

Bounds = tuple[tuple[int, int], ...]  # (start, stop) per dimension of a box in the global array


def merge_fragments(fragments: list[tuple[Bounds, np.ndarray]]) -> list[tuple[Bounds, np.ndarray]]:
    """Joins boxes that touch along one dimension and agree on all others, until none do.

    A process's shards of an array sharded over a process-major mesh are a grid of equal boxes
    filling one box, which this reduces to a single block; other layouts keep what cannot be joined.
    """
    while len(fragments) > 1:
        before = len(fragments)
        for axis in range(len(fragments[0][0])):
            fragments = _merge_along(fragments, axis)
        if len(fragments) == before:
            break
    return fragments


def _merge_along(fragments, axis: int):
    rows: dict[Bounds, list] = {}
    for bounds, data in fragments:
        rows.setdefault(bounds[:axis] + bounds[axis + 1 :], []).append((bounds, data))
    merged = []
    for row in rows.values():
        row.sort(key=lambda fragment: fragment[0][axis][0])
        run = [row[0]]
        for fragment in row[1:]:
            if fragment[0][axis][0] == run[-1][0][axis][1]:
                run.append(fragment)
            else:
                merged.append(_join(run, axis))
                run = [fragment]
        merged.append(_join(run, axis))
    return merged


def _join(run, axis: int):
    if len(run) == 1:
        return run[0]
    first = run[0][0]
    bounds = first[:axis] + ((first[axis][0], run[-1][0][axis][1]),) + first[axis + 1 :]
    return bounds, np.concatenate([data for _, data in run], axis=axis)


def _owned_shards(array: jax.Array, replica_id: int) -> list:
    """The shards of `array` this process writes (replica `replica_id` of each), their device-to-host
    copies started."""
    shards = [shard for shard in array.addressable_shards if shard.replica_id == replica_id]
    for shard in shards:
        shard.data.copy_to_host_async()
    return shards


def _host_fragments(array: jax.Array, shards: list) -> list[tuple[Bounds, np.ndarray]]:
    """`shards` of `array` as host copies with their bounds (waits for their copies)."""
    fragments = []
    for shard in shards:
        data = np.asarray(shard.data)
        if data.base is not None:  # a view of the device buffer (CPU): keep it from the next step
            data = data.copy()
        bounds = tuple(index.indices(size)[:2] for index, size in zip(shard.index, array.shape))
        fragments.append((bounds, data))
    return fragments


class BlockArrayHandler(ocp.type_handlers.ArrayHandler):
    """ArrayHandler whose saves write merged per-process blocks; restores are Orbax's own."""

    def __init__(self, **kwargs):
        super().__init__(enable_write_sharding_file=False, use_replica_parallel=False, **kwargs)

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        for value, info in zip(values, infos):
            if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
                raise ValueError(
                    f"{info.name}: typed PRNG keys are not written by this handler; "
                    "save jax.random.key_data(key) instead"
                )
            if jax.process_count() > 1 and value.is_fully_addressable:
                raise ValueError(
                    f"{info.name}: a process-local array (sharding {value.sharding}) cannot be "
                    "saved by a multi-process run; make it a global array first"
                )
        # Every array's copies start before the first is waited for, so they overlap on accelerators.
        owned = [_owned_shards(value, self._replica_id) for value in values]
        blocks = [merge_fragments(_host_fragments(value, shards)) for value, shards in zip(values, owned)]
        chunks = [value.sharding.shard_shape(value.shape) for value in values]
        primary = multihost.is_primary_host(self._primary_host)

        async def write():
            for info in infos:
                await info.await_path_creation()
            use_ocdbt = bool(infos[0].is_ocdbt_checkpoint)
            transaction = ts.Transaction(atomic=True) if use_ocdbt else None
            # The primary process creates each array's metadata; the others open it as known.
            opening = [
                ts.open(
                    ts.Spec(
                        ts_utils.build_array_write_spec(
                            info,
                            arg,
                            global_shape=value.shape,
                            local_shape=chunk,
                            dtype=value.dtype,
                            use_ocdbt=use_ocdbt,
                            process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt),
                            metadata_key=self._metadata_key,
                        ).json
                    ),
                    create=primary,
                    open=True,
                    assume_metadata=not primary,
                    context=info.ts_context,
                    transaction=transaction,
                )
                for value, info, arg, chunk in zip(values, infos, args, chunks)
            ]
            # Waiting on the futures in turn from this thread (its event loop runs only this
            # coroutine) replaces one loop wake-up per write with none.
            writes = [
                store[tuple(slice(*b) for b in bounds)].write(data, can_reference_source_data_indefinitely=True)
                for store, array_blocks in zip((o.result() for o in opening), blocks)
                for bounds, data in array_blocks
            ]
            for pending in writes:
                pending.result()
            if transaction is not None:
                await transaction.commit_async()

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="block_array_handler")]
