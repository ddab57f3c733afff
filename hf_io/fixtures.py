"""Release-layout checkpoints made from random numbers, for tests and benchmarks: an index, several
shards, a config.json, and every tensor named, shaped and encoded as the release stores it.

`quantise=True` draws weights and quantises them with the real encoders (tests of the formats);
`quantise=False` draws the stored code and scale bytes directly (large benchmark checkpoints in
seconds rather than minutes).
"""

import json
import os

import numpy as np

from hf_io import release_format
from hf_io.hf_config import config_json
from hf_io.release_names import INDEX, release_tensors
from hf_io.safetensors_writer import write_shards
from model.args import ModelArgs

DEFAULT_SHARD_BYTES = 256 << 10


def random_value(tensor, rng: np.random.Generator, num_experts: int) -> np.ndarray:
    """A float32 (or int64 table) value in the release layout, scaled like the tensor's role."""
    shape, name = tuple(tensor.shape), tensor.name
    if tensor.storage == INDEX:
        return np.stack([rng.permutation(num_experts)[: shape[1]] for _ in range(shape[0])]).astype(np.int64)
    if "norm" in name or name.endswith("_scale"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)


def write_release_checkpoint(
    directory: str,
    args: ModelArgs,
    fmt: str = release_format.FP8_RELEASE,
    seed: int = 0,
    quantise: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Writes the checkpoint into `directory` (created); returns its index."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = release_tensors(args)
    plan = [planned for tensor in tensors for planned in release_format.plan(tensor, fmt)]

    def arrays():
        for tensor in tensors:
            stored = None if quantise else release_format.random_codes(tensor, fmt, rng)
            if stored is None:
                stored = release_format.encode(tensor, random_value(tensor, rng, args.num_routed_experts), fmt)
            yield from stored

    index = write_shards(directory, plan, arrays(), max_shard_bytes)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_json(args, quantized=fmt != release_format.BF16), f, indent=2)
    return index
