"""Fitting examples into fixed-length rows: the over-long policy, then grain's first-fit packing.

Rows carry the four batch fields the model and loss consume, each int32[seq_len]:
- `tokens`: ids, the template's pad token on padding (never attended to or scored: segment id 0);
- `loss_mask`: 1 on target tokens (see `encode`), 0 elsewhere and on padding;
- `segment_ids`: 1, 2, 3... per example in the row, 0 on padding;
- `positions`: 0, 1, 2... restarting at each example, 0 on padding.
With packing off, each row holds one example (same code path, at most one sequence per bin).
"""

import grain
import numpy as np

from data.errors import LoadStats

OVERLONG_POLICIES = ("truncate", "drop")
FIELDS = ("tokens", "loss_mask")
BATCH_FIELDS = ("tokens", "loss_mask", "segment_ids", "positions")  # a packed row; every objective's batch has these


def fit_length(
    examples: list[dict[str, np.ndarray]], seq_len: int, policy: str, stats: LoadStats
) -> list[dict[str, np.ndarray]]:
    """Examples no longer than seq_len. "truncate" keeps the first seq_len tokens (counted under
    `truncated`); "drop" removes the example. A truncation that leaves no target token is a drop
    (nothing to learn from it); drops count under `dropped_too_long`."""
    if policy not in OVERLONG_POLICIES:
        raise ValueError(f"overlong policy {policy!r} is not one of {OVERLONG_POLICIES}")
    kept = []
    for example in examples:
        if len(example["tokens"]) > seq_len:
            cut = {k: v[:seq_len] for k, v in example.items()}
            if policy == "drop" or not cut["loss_mask"].any():
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            example = cut
        kept.append(example)
    return kept


def _to_batch_fields(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": row["tokens"],
        "loss_mask": row["loss_mask"],
        "segment_ids": row["tokens_segment_ids"],
        "positions": row["tokens_positions"],
    }


def pack(
    examples: grain.IterDataset, *, seq_len: int, num_bins: int, enabled: bool, seed: int, pad_id: int
) -> grain.IterDataset:
    """Rows of int32[seq_len] fields from examples of int32[<=seq_len]; bins are emitted in a
    seeded order so a row does not always hold the shortest leftovers."""
    packed = grain.experimental.FirstFitPackIterDataset(
        examples,
        length_struct={k: seq_len for k in FIELDS},
        num_packing_bins=num_bins,
        seed=seed,
        max_sequences_per_bin=None if enabled else 1,
        padding_struct={"tokens": pad_id, "loss_mask": 0},
    )
    return packed.map(_to_batch_fields)


def pair_row(sides: dict[str, dict[str, np.ndarray]], seq_len: int, pad_id: int) -> dict[str, np.ndarray] | None:
    """A preference pair ({"chosen"|"rejected": {"tokens", "loss_mask"}}, see encode.preference_sequences)
    as one row of the four batch fields: chosen = segment 1, rejected = segment 2, each with positions
    from 0; None when both do not fit in seq_len."""
    chosen, rejected = sides["chosen"], sides["rejected"]
    lengths = (len(chosen["tokens"]), len(rejected["tokens"]))
    if sum(lengths) > seq_len:
        return None
    pad = seq_len - sum(lengths)
    fill = lambda parts, value: np.concatenate(parts + [np.full(pad, value, np.int32)]).astype(np.int32)
    return {
        "tokens": fill([chosen["tokens"], rejected["tokens"]], pad_id),
        "loss_mask": fill([chosen["loss_mask"], rejected["loss_mask"]], 0),
        "segment_ids": fill([np.full(lengths[0], 1), np.full(lengths[1], 2)], 0),
        "positions": fill([np.arange(lengths[0]), np.arange(lengths[1])], 0),
    }
