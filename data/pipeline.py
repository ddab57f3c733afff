"""The grain graph from config to batches, and the loaders for preference and prompt sets.

sources --read+validate+tokenise (eager)--> examples --shuffle per epoch, mix by weight, this process's
share--> first-fit pack, batch, prefetch. Invariants: reading is eager, so a bad line is reported (or
counted) before training starts; mixture weights are shares of examples; the order depends on the seed,
the weights and the process index only, and `get_state()` restores the exact position. Start at
`build_sft_pipeline`. Design notes: docs/data.md.
"""

import atexit
import dataclasses
import functools
import weakref

import grain
import ml_collections
import numpy as np

from data import packing
from data.chat_template import get_template
from data.encode import (
    REFERENCE_LOGPS,
    Encoder,
    encode_preference,
    encode_prompt,
    encode_sft,
    preference_sequences,
    reject,
)
from data.errors import DataError, InvalidRecord, LoadStats
from data.formats import parse_preference, parse_prompt, parse_sft
from data.jsonl import read_records
from data.shuffle import EpochShuffle
from data.tokenizer import Tokenizer


@dataclasses.dataclass
class SFTPipeline:
    """`dataset` yields {"tokens","loss_mask","segment_ids","positions"}: int32[batch, seq_len],
    batch = global_batch_size / process_count. Iterate with `iter(pipeline)`; save the iterator's
    `get_state()` with the train state and `set_state` it on restore."""

    dataset: grain.IterDataset
    stats: LoadStats
    encoder: Encoder

    def __iter__(self) -> grain.DatasetIterator:
        iterator = iter(self.dataset)
        _LIVE_ITERATORS.add(iterator)
        return iterator


# The prefetch thread must stop before the interpreter tears down, or the process aborts at exit
# ("terminate called without an active exception"); iterators still alive then are closed here.
_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()


def build_encoder(config: ml_collections.ConfigDict) -> Encoder:
    template = get_template(config.template, config.get("custom_template"))
    return Encoder(Tokenizer.load(config.tokenizer_path), template, config.loss_mask, config.vocab_size)


@dataclasses.dataclass
class Examples:
    """Every source's examples, read, validated and encoded once: what each stream takes its share of."""

    per_source: list[list]
    weights: list[float]
    stats: LoadStats


def read_sft_examples(config: ml_collections.ConfigDict, encoder: Encoder) -> Examples:
    """The encoded SFT examples of every `config.sft_sources` pattern that fit the length policy."""
    stats = LoadStats()
    examples, weights = [], []
    for pattern, weight in config.sft_sources:
        records = list(read_records(pattern, parse_sft, skip_bad=config.skip_bad_records, stats=stats))
        encoded = encode_sft(records, encoder, skip_bad=config.skip_bad_records, stats=stats)
        kept = packing.fit_length(encoded, config.seq_len, config.overlong, stats)
        if not kept:
            raise DataError(
                pattern, "no usable example left after validation and the length policy", reason="no_examples"
            )
        stats.records_kept += len(kept)
        examples.append(kept)
        weights.append(float(weight))
    return Examples(examples, weights, stats)


def sft_stream(
    config: ml_collections.ConfigDict,
    examples: Examples,
    encoder: Encoder,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> SFTPipeline:
    """Stream `process_index` of `process_count`: its share of the mixed examples, packed into rows."""
    _check_process_share(config, process_count)
    rows = packing.pack(
        _mixed_share(examples.per_source, examples.weights, config, process_index, process_count),
        seq_len=config.seq_len,
        num_bins=config.num_packing_bins,
        enabled=config.pack,
        seed=config.shuffle_seed,
        pad_id=encoder.tokenizer.token_id(encoder.template.pad),
    )
    return _batched(rows, config, process_count, examples.stats, encoder)


def build_sft_pipeline(
    config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1, encoder: Encoder | None = None
) -> SFTPipeline:
    """Batches for SFT (pass jax.process_index() / jax.process_count() on a multi-host run)."""
    _check_process_share(config, process_count)
    encoder = encoder or build_encoder(config)
    return sft_stream(
        config, read_sft_examples(config, encoder), encoder, process_index=process_index, process_count=process_count
    )


def _check_process_share(config, process_count: int) -> None:
    if config.global_batch_size % process_count:
        raise ValueError(f"global_batch_size {config.global_batch_size} does not split over {process_count} processes")


def _mixed_share(
    examples: list[list], weights: list[float], config, process_index: int, process_count: int
) -> grain.IterDataset:
    """Each source shuffled per epoch and repeated, sources mixed by weight, this process's share."""
    sources = []
    for i, source_examples in enumerate(examples):
        ds = grain.MapDataset.source(source_examples)
        if config.shuffle:
            ds = EpochShuffle(ds, seed=config.shuffle_seed + i)
        sources.append(ds.repeat(config.num_epochs))
    mixed = sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, weights)
    return mixed[process_index::process_count].to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_buffer)
    )


def _batched(rows: grain.IterDataset, config, process_count: int, stats: LoadStats, encoder: Encoder):
    batches = rows.batch(config.global_batch_size // process_count, drop_remainder=True)
    if config.prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.prefetch)
    return SFTPipeline(batches, stats, encoder)


def read_preference_examples(
    config: ml_collections.ConfigDict, encoder: Encoder, with_reference: bool = False
) -> Examples:
    """One row per pair of every `config.preference_sources` pattern (`preference_rows`); a pair
    longer than the row is dropped and counted (a cut reply would compare different things).
    `with_reference`: every pair must carry its reference log-probabilities (`reference_logps`)."""
    stats = LoadStats()
    examples, weights = [], []
    for pattern, weight in config.preference_sources:
        rows = [row for _, row in preference_rows(pattern, encoder, config, stats, require_reference=with_reference)]
        if not rows:
            raise DataError(pattern, f"no preference pair fits seq_len={config.seq_len}", reason="no_examples")
        examples.append(rows)
        weights.append(float(weight))
    return Examples(examples, weights, stats)


def preference_stream(
    config: ml_collections.ConfigDict,
    examples: Examples,
    encoder: Encoder,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> SFTPipeline:
    """Stream `process_index` of `process_count`: its share of the mixed pair rows, one pair per row."""
    _check_process_share(config, process_count)
    return _batched(
        _mixed_share(examples.per_source, examples.weights, config, process_index, process_count),
        config,
        process_count,
        examples.stats,
        encoder,
    )


def build_preference_pipeline(
    config: ml_collections.ConfigDict,
    *,
    process_index: int = 0,
    process_count: int = 1,
    encoder: Encoder | None = None,
    with_reference: bool = False,
) -> SFTPipeline:
    """Batches for DPO from `config.preference_sources` (read_preference_examples), one pair per row
    (chosen = segment 1, rejected = segment 2); with `with_reference`, `reference_logps` float32[batch, 2]."""
    _check_process_share(config, process_count)
    encoder = encoder or build_encoder(config)
    return preference_stream(
        config,
        read_preference_examples(config, encoder, with_reference),
        encoder,
        process_index=process_index,
        process_count=process_count,
    )


def preference_rows(
    pattern: str,
    encoder: Encoder,
    config: ml_collections.ConfigDict,
    stats: LoadStats,
    *,
    require_reference: bool = False,
):
    """(the record as read, its batch row) of every pair of `pattern` that fits `config.seq_len`, in file
    order; the row is `packing.pair_row` (chosen = segment 1, rejected = segment 2, replies in the loss
    mask), plus `reference_logps` float32[2] when `require_reference` (a pair without them is bad).
    Pairs that do not fit are counted in `stats.dropped_too_long`."""
    pad_id = encoder.tokenizer.token_id(encoder.template.pad)
    parse = functools.partial(parse_preference, require_reference=require_reference)
    for located, pair in _encoded_records(
        pattern,
        lambda value: (value, parse(value)),
        lambda record, enc: encode_preference(record[1], enc),
        encoder,
        config.skip_bad_records,
        stats,
        PAIR_ARRAYS,
    ):
        row = packing.pair_row(preference_sequences(pair), config.seq_len, pad_id)
        if row is None:
            stats.dropped_too_long += 1
            continue
        if require_reference:
            row[REFERENCE_LOGPS] = pair[REFERENCE_LOGPS]
        yield located.record[0], row


def load_conversations(pattern: str, *, skip_bad: bool = False, stats: LoadStats | None = None) -> list:
    """The SFT conversations of a held-out set, for `evaluation.exact_match_accuracy`."""
    stats = stats or LoadStats()
    return [r.record for r in read_records(pattern, parse_sft, skip_bad=skip_bad, stats=stats)]


def _encoded_records(pattern, parse, encode, encoder, skip_bad, stats, arrays):
    """(Located, encode(record)) of every record whose `arrays` are in the vocabulary."""
    for located in read_records(pattern, parse, skip_bad=skip_bad, stats=stats):
        try:
            item = encode(located.record, encoder)
            for key in arrays:
                encoder.check_vocab(item[key])
        except InvalidRecord as e:
            reject(located, e, skip_bad=skip_bad, stats=stats)
            continue
        stats.records_kept += 1
        yield located, item


def _load_encoded(pattern, parse, encode, encoder, skip_bad, stats, arrays):
    return [item for _, item in _encoded_records(pattern, parse, encode, encoder, skip_bad, stats, arrays)]


PAIR_ARRAYS = ("prompt", "chosen", "rejected")


def load_preferences(
    pattern: str, encoder: Encoder, *, skip_bad: bool = False, stats: LoadStats | None = None
) -> list[dict[str, np.ndarray]]:
    """[{"prompt": int32[P], "chosen": int32[C], "rejected": int32[R]}] (see encode_preference)."""
    return _load_encoded(
        pattern, parse_preference, encode_preference, encoder, skip_bad, stats or LoadStats(), PAIR_ARRAYS
    )


def load_prompts(
    pattern: str, encoder: Encoder, *, skip_bad: bool = False, stats: LoadStats | None = None
) -> list[dict]:
    """[{"prompt": int32[P], "answer": str | None, "extra": dict}] (see encode_prompt)."""
    return _load_encoded(pattern, parse_prompt, encode_prompt, encoder, skip_bad, stats or LoadStats(), ("prompt",))
