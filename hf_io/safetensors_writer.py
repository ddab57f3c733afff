"""Writes safetensors shards and their index from a planned list of tensors, streaming: each shard's
header is written first (names, dtypes and shapes are known in advance), then the tensors' bytes in
plan order as the caller produces them, so only one tensor is held at a time."""

import dataclasses
import json
import math
import os
from typing import Iterable, Iterator

import numpy as np

from hf_io.safetensors_reader import INDEX_FILE, NUMPY_DTYPES

HEADER_ALIGNMENT = 8


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * NUMPY_DTYPES[self.dtype].itemsize


def split_into_shards(plan: list, max_shard_bytes: int) -> list:
    """Consecutive runs of the plan, each at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards, current, size = [], [], 0
    for tensor in plan:
        if current and size + tensor.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _header(tensors: list) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for tensor in tensors:
        entries[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(entries, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    return len(encoded).to_bytes(8, "little") + encoded


def write_bytes(f, data) -> None:
    """The one place shard bytes reach the file (tests make it fail as a full disk would)."""
    f.write(data)


def write_shards(
    directory: str, plan: list, arrays: Iterable[np.ndarray], max_shard_bytes: int, on_tensor=None
) -> dict:
    """Writes `plan` (PlannedTensors) into shards under `directory`, taking the arrays in plan order
    from `arrays`; writes the index and returns it. `on_tensor(planned)` is called after each tensor.
    A produced array whose dtype or shape differs from its plan entry is an error naming the tensor."""
    shards = split_into_shards(plan, max_shard_bytes)
    source: Iterator = iter(arrays)
    weight_map = {}
    for shard_index, tensors in enumerate(shards):
        file_name = shard_file_name(shard_index, len(shards))
        path = os.path.join(directory, file_name)
        with open(path, "wb") as f:
            write_bytes(f, _header(tensors))
            for tensor in tensors:
                array = next(source)
                expected = NUMPY_DTYPES[tensor.dtype]
                if array.dtype != expected or tuple(array.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"{path}: tensor {tensor.name!r} was produced as {array.dtype} "
                        f"{list(array.shape)}, planned {tensor.dtype} {list(tensor.shape)}"
                    )
                write_bytes(f, np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
                weight_map[tensor.name] = file_name
                if on_tensor is not None:
                    on_tensor(tensor)
    index = {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return index
