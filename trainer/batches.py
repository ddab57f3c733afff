"""Global batches from per-process reading: each process reads only the rows its devices hold.

The global batch is cut into `streams` blocks of consecutive rows; stream s is the pipeline of
`sft_stream(process_index=s, process_count=streams)` (its own share of the examples, packed on its
own); the files are read, validated and encoded once per process, whatever its stream count. A
process reads the streams that cover the rows of its addressable devices and hands them to `jax.make_array_from_process_local_data`, which assembles one global array over all
processes. The batches therefore depend on the stream count alone, not on how many processes read
them: with `data.streams` fixed, 1 process x 8 devices and 2 processes x 4 devices train on the same
batches, and a checkpoint's data position (one state per stream) resumes under any process count
whose rows fall on stream boundaries. `data.streams=0` means one stream per process.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Sharding

from configs.release import ConfigError
from data.packing import BATCH_FIELDS
from data.pipeline import build_encoder, read_sft_examples, sft_stream
from mesh.processes import allgather_json


class DataExhausted(Exception):
    """The data ran out (finite `data.num_epochs`): the run saves and ends."""


def process_rows(sharding: Sharding, shape: tuple[int, ...]) -> list[int]:
    """The batch rows (dimension 0) that this process's devices hold under `sharding`, ascending."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[0].indices(shape[0])))
    return sorted(rows)


class GlobalBatches:
    """Iterator of global arrays with `sharding`, one per field: by default {"tokens","loss_mask",
    "segment_ids","positions"} int32[batch, seq_len]; `get_state()` / `set_state()` save and restore
    every stream's position. `encoder` and `stats` are those of the pipelines
    (`data.pipeline.SFTPipeline`).

    Every process must call `get_state` at the same step (it gathers the other processes' streams).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        sharding: Sharding,
        read=read_sft_examples,
        stream=sft_stream,
        fields=None,
    ):
        """`read(config, encoder)` reads the examples once (`read_sft_examples`, or
        `read_preference_examples` for DPO pairs) and `stream(config, examples, encoder,
        process_index=, process_count=)` makes one stream's pipeline of them (`sft_stream`,
        `preference_stream`). `fields` maps each
        batch key to (dims after the batch dim, dtype) (trainer.batch_source.batch_fields); default
        the token fields, int32[batch, seq_len] each."""
        self.streams = config.streams or jax.process_count()
        self.shape = (config.global_batch_size, config.seq_len)
        fields = fields or {key: ((config.seq_len,), np.int32) for key in BATCH_FIELDS}
        self.fields = {
            key: ((config.global_batch_size, *dims), np.dtype(dtype)) for key, (dims, dtype) in fields.items()
        }
        self.sharding = sharding
        if config.global_batch_size % self.streams:
            raise ConfigError(
                f"global_batch_size {config.global_batch_size} does not split into {self.streams} data streams"
            )
        rows_per_stream = config.global_batch_size // self.streams
        rows = process_rows(sharding, self.shape)
        self.local_streams = sorted({row // rows_per_stream for row in rows})
        if rows != [row for s in self.local_streams for row in range(s * rows_per_stream, (s + 1) * rows_per_stream)]:
            raise ConfigError(
                f"process {jax.process_index()} holds batch rows {rows}, not whole blocks of "
                f"{rows_per_stream} rows: set data.streams to a multiple of {len(rows)}"
            )
        self.encoder = build_encoder(config)
        examples = read(config, self.encoder)
        pipelines = [
            stream(config, examples, self.encoder, process_index=s, process_count=self.streams)
            for s in self.local_streams
        ]
        self.stats = examples.stats
        self._num_epochs = config.num_epochs
        # Finite data on several processes: they agree, every step, whether any stream has ended.
        self._agree_on_end = config.num_epochs is not None and jax.process_count() > 1
        self._iterators = [iter(pipeline) for pipeline in pipelines]

    def abstract(self) -> dict:
        """ShapeDtypeStructs of a batch, e.g. to compile the step before the first batch exists."""
        return {
            key: jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharding)
            for key, (shape, dtype) in self.fields.items()
        }

    def __iter__(self):
        return self

    def next(self, state) -> dict:
        """The next batch (the train state does not matter for read data)."""
        del state
        return next(self)

    def metrics(self) -> dict:
        return self.stats.as_metrics()

    def __next__(self) -> dict:
        """The next global batch; DataExhausted on every process at the same step once a stream of any
        process has run out (data.num_epochs set)."""
        parts, ended = [], None
        for stream, iterator in zip(self.local_streams, self._iterators):
            try:
                parts.append(next(iterator))
            except StopIteration:
                ended = stream
                break
        if self._agree_on_end:
            ended = min((s for s in allgather_json(ended) if s is not None), default=None)
        if ended is not None:
            raise DataExhausted(
                f"data stream {ended} of {self.streams} ran out after data.num_epochs="
                f"{self._num_epochs} epoch(s) of its sources"
            )
        return {
            key: jax.make_array_from_process_local_data(
                self.sharding, np.concatenate([np.asarray(part[key], dtype) for part in parts]), shape
            )
            for key, (shape, dtype) in self.fields.items()
        }

    def get_state(self) -> list:
        """The position of every stream (of all processes), in stream order."""
        states = {}
        for gathered in allgather_json([[s, it.get_state()] for s, it in zip(self.local_streams, self._iterators)]):
            states.update(dict(gathered))
        return [states[s] for s in range(self.streams)]

    def set_state(self, states) -> None:
        """Restores `get_state()`'s list; a lone state (checkpoints from before streams) is one stream."""
        if not isinstance(states, list):
            states = [states]
        if len(states) != self.streams:
            raise ConfigError(
                f"the checkpoint's data position has {len(states)} streams and this run reads "
                f"{self.streams}: run with --config.data.streams={len(states)}"
            )
        for s, iterator in zip(self.local_streams, self._iterators):
            iterator.set_state(states[s])
