"""Seeded per-epoch shuffling of an in-memory dataset, by explicit permutation.

grain's lazy `MapDataset.shuffle` gets slow per element on small sources (figures: docs/benchmarks.md),
which would stall a mixture. Our examples are already in memory, so a permutation array per epoch
(8 bytes per example) makes every element O(1) and keeps random access by index, which is what makes
the iterator state a single position.
"""

import functools

import grain
import numpy as np


class EpochShuffle(grain.MapDataset):
    """Element i of epoch e is parent[permutation(seed, e)[i]]; each epoch has its own order.
    Indices run past one epoch (after `repeat`) and select the epoch."""

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._permutation = functools.lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self._seed, epoch)).permutation(len(self._parent))

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, len(self._parent))
        return self._parent[int(self._permutation(epoch)[position])]

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"
