"""The grain pipeline: batch fields as the model consumes them, packing that keeps examples intact,
the over-long policy, seeded shuffling, per-process shards, mixture weights, and an iterator whose
saved state resumes with exactly the same batches."""

import itertools
import json

import grain
import numpy as np
import pytest

from configs.data import get_config
from data.encode import encode_sft
from data.errors import LoadStats
from data.formats import parse_sft
from data.jsonl import Located
from data.pipeline import build_sft_pipeline
from data.shuffle import EpochShuffle

SEQ_LEN = 64
BATCH = 4
NUM_RECORDS = 120
FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")


def _conversation(i):
    return {
        "messages": [{"role": "user", "content": f"add {i} {i + 1}"}, {"role": "assistant", "content": str(2 * i + 1)}]
    }


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(NUM_RECORDS)))
    return str(path)


def _config(path, **overrides):
    fields = dict(sft_sources=((path, 1.0),), seq_len=SEQ_LEN, global_batch_size=BATCH, num_packing_bins=4)
    fields.update(overrides)
    return get_config(**fields)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _segments(batch):
    """(tokens, loss_mask) of every packed example, row by row."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        for seg in np.unique(batch["segment_ids"][row][batch["segment_ids"][row] > 0]):
            where = batch["segment_ids"][row] == seg
            out.append((tuple(batch["tokens"][row][where]), tuple(batch["loss_mask"][row][where])))
    return out


def _encoded(path, pipeline):
    records = [Located(parse_sft(_conversation(i)), path, i + 1) for i in range(NUM_RECORDS)]
    return {
        (tuple(e["tokens"]), tuple(e["loss_mask"]))
        for e in encode_sft(records, pipeline.encoder, skip_bad=False, stats=LoadStats())
    }


def test_batch_fields_follow_the_contract(sft_file):
    pipeline = build_sft_pipeline(_config(sft_file))
    for batch in _take(iter(pipeline), 3):
        assert set(batch) == set(FIELDS)
        for name in FIELDS:
            assert batch[name].shape == (BATCH, SEQ_LEN) and batch[name].dtype == np.int32, name
        seg, pos = batch["segment_ids"], batch["positions"]
        pad = seg == 0
        assert not (batch["loss_mask"][pad].any() or pos[pad].any())
        assert (batch["tokens"][pad] == pipeline.encoder.tokenizer.token_id("<｜▁pad▁｜>")).all()
        for row in range(BATCH):  # segments are 1, 2, 3... left to right, positions restart at each
            ids = seg[row][~pad[row]]
            assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}
            starts = np.flatnonzero(np.diff(seg[row], prepend=0) != 0)
            for start, end in zip(starts, list(starts[1:]) + [SEQ_LEN]):
                if seg[row][start]:
                    np.testing.assert_array_equal(
                        pos[row][start:end][seg[row][start:end] > 0], np.arange((seg[row][start:end] > 0).sum())
                    )
        assert (seg.max(axis=1) > 1).all()  # packing puts several short examples in a row
        # Every target has a predecessor in its own segment (the head at i-1 is scored on it).
        rows, cols = np.nonzero(batch["loss_mask"])
        assert (cols > 0).all() and (seg[rows, cols - 1] == seg[rows, cols]).all()


def test_packed_segments_are_whole_examples(sft_file):
    pipeline = build_sft_pipeline(_config(sft_file))
    examples = _encoded(sft_file, pipeline)
    for batch in _take(iter(pipeline), 3):
        for segment in _segments(batch):
            assert segment in examples


def test_unpacked_rows_hold_one_example(sft_file):
    batch = next(iter(build_sft_pipeline(_config(sft_file, pack=False))))
    assert (batch["segment_ids"].max(axis=1) == 1).all()


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_examples_are_counted(tmp_path, policy):
    # Digits are one token each, so these lengths are known: a long reply, and a long prompt.
    long_reply = {"messages": [{"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "7" * 100}]}
    no_target = {"messages": [{"role": "user", "content": "7" * 100}, {"role": "assistant", "content": "y"}]}
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [long_reply, no_target, _conversation(1)]))
    pipeline = build_sft_pipeline(_config(str(path), overlong=policy))
    expected = {"truncate": (1, 1), "drop": (0, 2)}[policy]  # (truncated, dropped)
    assert (pipeline.stats.truncated, pipeline.stats.dropped_too_long) == expected
    assert next(iter(pipeline))["tokens"].shape == (BATCH, SEQ_LEN)


def test_shuffle_is_deterministic_by_seed(sft_file):
    def first(seed):
        return _take(iter(build_sft_pipeline(_config(sft_file, shuffle_seed=seed))), 2)

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        for name in FIELDS:
            np.testing.assert_array_equal(x[name], y[name])
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_processes_get_disjoint_shares(sft_file):
    seen = []
    for index in range(2):
        pipeline = build_sft_pipeline(_config(sft_file, num_epochs=1), process_index=index, process_count=2)
        batches = list(pipeline)
        assert batches[0]["tokens"].shape == (BATCH // 2, SEQ_LEN)
        seen.append({s for b in batches for s in _segments(b)})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) > 0.8 * NUM_RECORDS  # all but the remainder of the last batches
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        build_sft_pipeline(_config(sft_file), process_count=3)


def test_epochs_reshuffle(sft_file):
    def order(epoch_batches):
        return [s for b in epoch_batches for s in _segments(b)]

    batches = list(build_sft_pipeline(_config(sft_file, num_epochs=2, pack=False)))
    per_epoch = NUM_RECORDS // BATCH
    first, second = order(batches[:per_epoch]), order(batches[per_epoch:])
    assert sorted(first) == sorted(second) and first != second


def test_mixture_weights(tmp_path):
    paths = []
    for name, marker in (("a", 10), ("b", 20)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"tokens": [marker, 3 + i % 5]}) + "\n" for i in range(50)))
        paths.append(str(path))
    config = _config(paths[0], sft_sources=((paths[0], 3.0), (paths[1], 1.0)), pack=False)
    batches = _take(iter(build_sft_pipeline(config)), 25)
    first_tokens = np.concatenate([b["tokens"][:, 0] for b in batches])
    assert np.mean(first_tokens == 10) == pytest.approx(0.75, abs=0.05)


def test_restored_iterator_continues_with_the_same_batches(sft_file):
    config = _config(sft_file, num_packing_bins=3)  # bins not a multiple of the batch: state mid-pack
    iterator = iter(build_sft_pipeline(config))
    _take(iterator, 5)
    state = iterator.get_state()
    json.dumps(state)  # saved with the train state, so it must be plain data
    expected = _take(iterator, 12)  # crosses the end of the first epoch

    restored = iter(build_sft_pipeline(config))
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 12)):
        for name in FIELDS:
            np.testing.assert_array_equal(want[name], got[name])


def test_finite_epochs_end(sft_file):
    batches = list(itertools.islice(build_sft_pipeline(_config(sft_file, num_epochs=1, pack=False)), 1000))
    assert len(batches) == NUM_RECORDS // BATCH


def test_a_glob_pattern_is_one_source(tmp_path):
    for part in range(3):
        (tmp_path / f"part-{part}.jsonl").write_text(json.dumps({"tokens": [10 + part, 3]}) + "\n")
    pipeline = build_sft_pipeline(_config(str(tmp_path / "part-*.jsonl"), pack=False, shuffle=False))
    assert pipeline.stats.records_kept == 3
    assert sorted(next(iter(pipeline))["tokens"][:3, 0]) == [10, 11, 12]


def test_epoch_shuffle_permutes_each_epoch_by_seed():
    source = grain.MapDataset.range(7)
    shuffled = EpochShuffle(source, seed=3).repeat(3)
    epochs = [[shuffled[e * 7 + i] for i in range(7)] for e in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs) and epochs[0] != epochs[1]
    assert [EpochShuffle(source, seed=3)[i] for i in range(7)] == epochs[0]
    assert [EpochShuffle(source, seed=4)[i] for i in range(7)] != epochs[0]
