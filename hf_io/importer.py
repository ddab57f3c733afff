"""Hugging Face checkpoint (release layout or `transformers`' `save_pretrained`) -> weights-only
Checkpointer step that `train.py --init_checkpoint` restores.

One source tensor at a time: read (positioned reads), dequantise (FP8 tiles, MXFP4), re-lay into our
layout, write its slice of the stacked leaf. Resident memory is a few tensors, whatever the model
size. Everything is validated first; the output appears only when complete (`atomic_directory`).

Storage dtype: `dtype` (bf16 by default) for tensors the checkpoint holds in bf16 or quantised (both
decode exactly into bf16); tensors it holds wider (F32: mHC, sinks, ape, router bias; or a float32
`transformers` save) keep float32, so nothing is rounded that was not already. Restores cast to the
train state's dtypes.
"""

import dataclasses

import numpy as np
from absl import logging

from configs.checkpoint_layout import config_to_json
from configs.release import ConfigError
from hf_io import quant
from hf_io.atomic import atomic_directory
from hf_io.orbax_writer import WeightsWriter, step_directory
from hf_io.progress import Progress
from hf_io.safetensors_reader import SafetensorsCheckpoint
from hf_io.team import SOLO, Team
from hf_io.validation import FP8_TILES, MXFP4, ConversionError, SourceTensor, check_source
from hf_io.weights_layout import model_leaves
from model.args import DTYPES, from_config

IMPORT_STEP = 0


@dataclasses.dataclass
class ImportSummary:
    tensors: int
    input_bytes: int
    leaves: int
    without_mtp: bool


def decode(checkpoint: SafetensorsCheckpoint, source: SourceTensor, dtype) -> np.ndarray:
    """The tensor's values in the release layout, as `dtype` (exact for the release's encodings); a
    value that decodes to NaN or Inf (e.g. a ue8m0 scale byte of 255) is a ConversionError naming
    the tensor and the first such element."""
    weight = checkpoint.read(source.weight)
    if source.encoding == MXFP4:
        value = quant.decode_fp4(weight, checkpoint.read(source.scale), source.weight, dtype)
    elif source.encoding == FP8_TILES:
        value = quant.decode_fp8(weight, checkpoint.read(source.scale), source.weight, dtype)
    elif weight.dtype.kind in "iu":
        return weight
    else:
        value = weight.astype(dtype)
    finite = np.isfinite(value.astype(np.float32))
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise ConversionError(
            f"{source.weight}: {int((~finite).sum())} values decode to NaN/Inf, the first at "
            f"{list(where)} ({value[where]})"
        )
    return value


def _storage(sources: list, leaves: dict, dtype) -> dict:
    """Leaf -> (storage dtype, positional dims) for every leaf the sources fill."""
    wide, positional = {}, {}
    for source in sources:
        leaf = source.tensor.leaf
        wide[leaf] = wide.get(leaf, False) or source.wide
        positional[leaf] = len(source.tensor.index)
    storage = {}
    for path, is_wide in wide.items():
        leaf = leaves[path]
        kind = leaf.dtype if leaf.dtype.kind in "iu" else np.dtype(np.float32) if is_wide else np.dtype(dtype)
        storage[leaf] = (kind, positional[path])
    return storage


def import_checkpoint(
    source_dir: str, output_dir: str, config, dtype: str = "bfloat16", dry_run: bool = False, team: Team = SOLO
) -> ImportSummary:
    """Converts `source_dir` for `config` (its `model` and target `mesh`) into workdir `output_dir`;
    in a team, this process converts its share of the tensors (hf_io/team.py)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} not allowed; allowed: {sorted(DTYPES)}")
    storage_dtype = np.dtype(DTYPES[dtype])
    args = from_config(config.model)
    checkpoint = SafetensorsCheckpoint(source_dir)
    sources = check_source(checkpoint, args)
    leaves = model_leaves(args, config.mesh)
    storage = _storage(sources, leaves, storage_dtype)
    without_mtp = not any(path.startswith("mtp.") for path in (s.tensor.leaf for s in sources))
    unfilled = sorted(path for path in leaves if leaves[path] not in storage and not path.startswith("mtp."))
    if unfilled:
        raise ConversionError(f"the config has parameters no release tensor fills: {unfilled[:20]}")
    if without_mtp and args.num_mtp_layers:
        logging.warning(
            "%s was saved by transformers, which has no MTP module: the output holds no MTP "
            "weights (train.py --init_checkpoint keeps their fresh initialisation)",
            source_dir,
        )
    sizes = {
        s.weight: checkpoint.tensors[s.weight].nbytes + (checkpoint.tensors[s.scale].nbytes if s.scale else 0)
        for s in sources
    }
    summary = ImportSummary(len(sources), sum(sizes.values()), len(storage), without_mtp)
    logging.info(
        "%s: %d tensors, %.2f GiB, fit the config; %d leaves to write",
        source_dir,
        summary.tensors,
        summary.input_bytes / 2**30,
        summary.leaves,
    )
    if dry_run:
        return summary
    share = [sources[i] for i in team.share([sizes[s.weight] for s in sources])]
    what = f"import {source_dir}" + (f" (process {team.index} of {team.count})" if team.count > 1 else "")
    progress = Progress(what, sum(sizes[s.weight] for s in share))
    with atomic_directory(output_dir, team) as temporary:
        writer = WeightsWriter(step_directory(temporary, IMPORT_STEP), storage, team)
        for source in share:
            tensor = source.tensor
            leaf = leaves[tensor.leaf]
            try:
                value = tensor.to_ours(decode(checkpoint, source, storage[leaf][0]), args)
                writer.write(leaf, tensor.index, value, source.weight)
            except Exception as error:
                writer.abandon()
                raise ConversionError(
                    f"{output_dir}: converting {source.weight} into {tensor.leaf}"
                    f"{list(tensor.index)} failed ({error}); nothing was written there"
                ) from error
            progress.advance(sizes[source.weight])
        try:
            writer.finish(config_to_json(config))
        except Exception as error:
            raise ConversionError(
                f"{output_dir}: finishing the checkpoint failed ({error}); nothing was written there"
            ) from error
    logging.info("wrote %s", output_dir)
    return summary
