"""Weights of a Checkpointer step (training or converted) -> safetensors shards + index + config.json
in the release layout, bf16 or re-quantised to the release's FP8/FP4 formats.

Checked first against the config (every leaf the release needs, with the model's shape), then
streamed: one leaf slice is read, re-laid out, encoded and appended to the current shard. The output
appears only when complete (`atomic_directory`).
"""

import json
import os

from absl import logging

from configs.release import ConfigError
from hf_io import release_format
from hf_io.atomic import atomic_directory
from hf_io.hf_config import config_json
from hf_io.orbax_reader import WeightsReader
from hf_io.progress import Progress
from hf_io.release_names import release_tensors
from hf_io.safetensors_writer import write_shards
from hf_io.validation import ConversionError
from hf_io.weights_layout import model_leaves
from model.args import from_config

DEFAULT_SHARD_BYTES = 5 << 30
SHOWN = 20


def _check_leaves(reader: WeightsReader, leaves: dict, wanted: set) -> None:
    """Every wanted leaf is saved with the model's shape; every saved weight is wanted."""
    saved = {name for name in reader.arrays if name.split(".", 1)[0] in ("params", "routing")}
    missing = sorted(leaves[path].name for path in wanted if leaves[path].name not in saved)
    misshaped = sorted(
        f"{leaves[path].name}: {list(reader.shape(leaves[path].name))}, the config needs {list(leaves[path].shape)}"
        for path in wanted
        if leaves[path].name in saved and reader.shape(leaves[path].name) != leaves[path].shape
    )
    unexpected = sorted(saved - {leaves[path].name for path in leaves})
    problems = [
        (title, lines)
        for title, lines in (
            ("missing weights", missing),
            ("mis-shaped weights", misshaped),
            ("unexpected weights", unexpected),
        )
        if lines
    ]
    if problems:
        raise ConversionError(
            f"{reader.state_dir} does not fit the config:\n"
            + "\n".join(f"{title} ({len(lines)}):\n  " + "\n  ".join(lines[:SHOWN]) for title, lines in problems)
        )


def export_checkpoint(
    workdir: str,
    output_dir: str,
    config,
    fmt: str = release_format.BF16,
    step: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    dry_run: bool = False,
) -> list:
    """Writes step `step` (None: the latest) of `workdir` to `output_dir`; returns the tensor plan."""
    if fmt not in (release_format.BF16, release_format.FP8_RELEASE):
        raise ConfigError(f"export format {fmt!r} not allowed; allowed: bf16, fp8")
    args = from_config(config.model)
    reader = WeightsReader(workdir, step)
    leaves = model_leaves(args, config.mesh)
    with_mtp = any(name.startswith(("params.mtp.", "routing.mtp.")) for name in reader.arrays)
    if not with_mtp and args.num_mtp_layers:
        logging.warning(
            "%s holds no MTP weights (converted from transformers?): the export has none either", reader.state_dir
        )
    tensors = release_tensors(args, with_mtp=with_mtp)
    _check_leaves(reader, leaves, {tensor.leaf for tensor in tensors})
    plan = [planned for tensor in tensors for planned in release_format.plan(tensor, fmt)]
    total = sum(planned.nbytes for planned in plan)
    logging.info("%s step %d: %d tensors, %.2f GiB in format %s", workdir, reader.step, len(plan), total / 2**30, fmt)
    if dry_run:
        return plan
    progress = Progress(f"export {workdir}", total)
    current = {}

    def arrays():
        for tensor in tensors:
            current["tensor"] = tensor.name
            value = tensor.to_release(reader.read(leaves[tensor.leaf].name, tensor.index), args)
            yield from release_format.encode(tensor, value, fmt)

    with atomic_directory(output_dir) as temporary:
        try:
            write_shards(
                temporary, plan, arrays(), max_shard_bytes, on_tensor=lambda planned: progress.advance(planned.nbytes)
            )
            with open(os.path.join(temporary, "config.json"), "w") as f:
                json.dump(config_json(args, quantized=fmt != release_format.BF16), f, indent=2)
        except Exception as error:
            raise ConversionError(
                f"{output_dir}: exporting {current.get('tensor')} failed ({error}); nothing was written there"
            ) from error
    logging.info("wrote %s", output_dir)
    return plan
