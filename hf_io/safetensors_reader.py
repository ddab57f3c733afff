"""Reads a safetensors checkpoint (one file, or `model.safetensors.index.json` plus shards) tensor by
tensor with positioned reads, never mapping a whole shard: resident memory is what the caller holds.

Opening parses every shard's header and checks it against the file and the index, so a truncated
shard or an index that disagrees with the shards fails before any tensor is read, naming the file
and tensor.
"""

import dataclasses
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from configs.release import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HEADER_LENGTH_BYTES = 8
MAX_HEADER_BYTES = 100 << 20

# safetensors dtype -> NumPy dtype. F8_E8M0 scales are kept as raw exponent bytes (a numeric cast
# of float8_e8m0fnu to an integer would destroy them); packed FP4 arrives as I8 or U8.
NUMPY_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(np.uint8),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


class CheckpointError(ConfigError):
    """The files are not a readable safetensors checkpoint; the message names file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict:
    """{tensor name: TensorInfo} of one shard, checked against the file's size and the dtypes."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{path}: truncated ({size} bytes, not even a header length)")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_bytes > size:
            raise CheckpointError(
                f"{path}: header length {header_bytes} does not fit the file ({size} bytes); "
                "the shard is truncated or not safetensors"
            )
        try:
            header = json.loads(f.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: header is not valid JSON ({error})") from None
    data_start = HEADER_LENGTH_BYTES + header_bytes
    tensors, problems = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in NUMPY_DTYPES:
            problems.append(f"tensor {name!r}: unsupported dtype {dtype}")
            continue
        if end - begin != math.prod(shape) * NUMPY_DTYPES[dtype].itemsize:
            problems.append(f"tensor {name!r}: {end - begin} bytes for {dtype} {list(shape)}")
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    beyond = sorted((t for t in tensors.values() if t.end > size), key=lambda t: t.start)
    if beyond:
        problems.append(
            f"truncated: the header describes {max(t.end for t in beyond)} bytes, the file has "
            f"{size}; tensors cut off: {[t.name for t in beyond][:10]}"
            + (f" and {len(beyond) - 10} more" if len(beyond) > 10 else "")
        )
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return tensors


class SafetensorsCheckpoint:
    """The tensors of a checkpoint directory by name, with the config.json next to them (if any)."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        missing_files = [name for name in files if not os.path.exists(os.path.join(directory, name))]
        if missing_files:
            raise CheckpointError(f"{index_path}: lists shard files that do not exist: {missing_files}")
        self.tensors: dict = {}
        for file_name in files:
            self.tensors.update(read_header(os.path.join(directory, file_name)))
        if weight_map is not None:
            self._check_index(index_path, weight_map)
        config_path = os.path.join(directory, "config.json")
        self.config = None
        if os.path.exists(config_path):
            with open(config_path) as f:
                self.config = json.load(f)

    def _check_index(self, index_path: str, weight_map: dict):
        """Every tensor in the index is in the shard it names, and every shard tensor is indexed."""
        problems = []
        for name, file_name in sorted(weight_map.items()):
            info = self.tensors.get(name)
            if info is None or os.path.basename(info.path) != file_name:
                problems.append(f"index entry {name!r} -> {file_name}: no such tensor in that shard")
        for name, info in sorted(self.tensors.items()):
            if name not in weight_map:
                problems.append(f"tensor {name!r} in {os.path.basename(info.path)} has no index entry")
        if problems:
            raise CheckpointError(
                f"{index_path} disagrees with the shards: "
                + "; ".join(problems[:20])
                + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
            )

    @property
    def files(self) -> list:
        return sorted({info.path for info in self.tensors.values()})

    def read(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array of its stored dtype (a fresh buffer, no mapping kept)."""
        info = self.tensors[name]
        out = np.empty(info.shape, NUMPY_DTYPES[info.dtype])
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(info.path, "rb", buffering=0) as f:
            done = 0
            while done < info.nbytes:
                got = os.preadv(f.fileno(), [view[done:]], info.start + done)
                if got == 0:
                    raise CheckpointError(f"{info.path}: tensor {name!r} ends early (file shrank while reading)")
                done += got
        return out
