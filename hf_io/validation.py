"""Checks a safetensors checkpoint against the tensors a model config needs, before anything is
written: every problem (missing, unexpected, mis-shaped, mis-typed tensors, a contradicting
config.json) is collected and reported at once, by tensor name; the result says how each tensor
is encoded so the importer can decode it without guessing."""

import dataclasses
import re

from absl import logging

from configs.release import ConfigError
from hf_io import hf_config, quant
from hf_io.release_names import (
    FP4,
    FP8,
    INDEX,
    MTP_PREFIX,
    ReleaseTensor,
    canonical_name,
    release_tensors,
    saved_by_transformers,
)
from hf_io.safetensors_reader import SafetensorsCheckpoint
from model.args import ModelArgs

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
WIDE_FLOAT_DTYPES = ("F16", "F32", "F64")  # not representable in bf16 without rounding
INDEX_DTYPES = ("I64", "I32")
SCALE_DTYPES = ("F8_E8M0", "F32")
PACKED_FP4_DTYPES = ("I8", "U8")
# Copies of the shared embedding/head some MTP exports carry; the model shares the main ones.
IGNORED = re.compile(r"^mtp\.\d+\.(embed|head)\.weight$")
# Encodings of a source tensor.
PLAIN, FP8_TILES, MXFP4 = "plain", "fp8_tiles", "mxfp4"
SHOWN = 20


class ConversionError(ConfigError):
    """The input does not fit the config, or the conversion failed; the message names what (a ConfigError:
    convert.py answers it with that one line)."""


class ConfigMismatch(ConversionError):
    """The checkpoint's config.json describes another model than the config given."""


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    tensor: ReleaseTensor
    weight: str  # name in the checkpoint
    scale: str | None  # name of the scale tensor, for quantised encodings
    encoding: str  # PLAIN / FP8_TILES / MXFP4
    wide: bool  # stored in a float type wider than bf16


def _listing(title: str, lines: list) -> str:
    more = f"\n  ... and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines[:SHOWN]) + more


def _shape_problems(name: str, stored: tuple, expected: tuple) -> list:
    return [] if tuple(stored) == tuple(expected) else [f"mis-shaped {name}: {list(stored)}, expected {list(expected)}"]


def _encoding(tensor: ReleaseTensor, weight, scale) -> tuple:
    """-> (encoding, problems) for one tensor given its stored weight (and scale) TensorInfo."""
    name, shape = tensor.name, tuple(tensor.shape)
    if tensor.storage == INDEX:
        if weight.dtype not in INDEX_DTYPES:
            return None, [f"mis-typed {name}: {weight.dtype}, expected one of {INDEX_DTYPES}"]
        return PLAIN, _shape_problems(name, weight.shape, shape)
    if weight.dtype in FLOAT_DTYPES:
        problems = _shape_problems(name, weight.shape, shape)
        if scale is not None:
            problems.append(f"unexpected {scale.name}: {name} is stored unquantised ({weight.dtype})")
        return PLAIN, problems
    quantised_dtypes = {FP8: ("F8_E4M3",), FP4: ("F8_E4M3",) + PACKED_FP4_DTYPES}.get(tensor.storage, ())
    if weight.dtype not in quantised_dtypes:
        return None, [f"mis-typed {name}: {weight.dtype}, expected one of {FLOAT_DTYPES + quantised_dtypes}"]
    if weight.dtype in PACKED_FP4_DTYPES:
        encoding, weight_shape, scale_shape, scale_dtypes = (
            MXFP4,
            quant.fp4_packed_shape(shape),
            quant.fp4_scale_shape(shape),
            ("F8_E8M0",),
        )
    else:
        encoding, weight_shape, scale_shape, scale_dtypes = FP8_TILES, shape, quant.tile_grid(shape), SCALE_DTYPES
    problems = []
    if weight.shape != weight_shape:
        problems.append(f"mis-shaped {name}: {list(weight.shape)}, expected {list(weight_shape)} for {weight.dtype}")
    if scale is None:
        problems.append(f"missing {tensor.scale_name} (the scale of {weight.dtype} {name})")
    elif scale.dtype not in scale_dtypes:
        problems.append(f"mis-typed {scale.name}: {scale.dtype}, expected one of {scale_dtypes}")
    elif scale.shape != scale_shape:
        problems.append(f"mis-shaped {scale.name}: {list(scale.shape)}, expected {list(scale_shape)}")
    return encoding, problems


def check_source(checkpoint: SafetensorsCheckpoint, args: ModelArgs) -> list:
    """-> SourceTensors for every tensor `args` needs, or raises ConversionError listing every problem.

    A checkpoint written by `transformers` holds no MTP tensors (it does not build the module); it is
    accepted without them, and the MTP weights are then left out (the caller reports it).
    """
    where = checkpoint.directory
    if checkpoint.config is not None:
        contradictions = hf_config.mismatches(checkpoint.config, args)
        if contradictions:
            raise ConfigMismatch(
                f"config mismatch: {where}/config.json describes another model than the "
                "config given:\n  " + "\n  ".join(contradictions)
            )
    stored = {}
    for name in checkpoint.tensors:
        stored.setdefault(canonical_name(name), []).append(name)
    problems = [f"duplicate {canonical}: stored as {names}" for canonical, names in stored.items() if len(names) > 1]
    stored = {canonical: names[0] for canonical, names in stored.items()}
    has_mtp = any(name.startswith(MTP_PREFIX) for name in stored)
    with_mtp = has_mtp or not saved_by_transformers(checkpoint.tensors)
    expected = release_tensors(args, with_mtp=with_mtp)
    used, sources, by_kind = set(), [], {"missing": [], "other": []}
    for tensor in expected:
        if tensor.name not in stored:
            by_kind["missing"].append(tensor.name)
            continue
        weight = checkpoint.tensors[stored[tensor.name]]
        scale_name = stored.get(tensor.scale_name) if tensor.scale_name != tensor.name else None
        scale = checkpoint.tensors[scale_name] if scale_name else None
        used.update(n for n in (tensor.name, tensor.scale_name if scale else None) if n)
        encoding, tensor_problems = _encoding(tensor, weight, scale)
        by_kind["other"] += tensor_problems
        if not tensor_problems:
            sources.append(
                SourceTensor(
                    tensor, weight.name, scale.name if scale else None, encoding, weight.dtype in WIDE_FLOAT_DTYPES
                )
            )
    ignored = sorted(name for name in set(stored) - used if IGNORED.match(name))
    if ignored:
        logging.info("%s: ignoring %s (the model shares the main embedding and head)", where, ignored)
    unexpected = sorted(set(stored) - used - set(ignored))
    sections = [_listing("missing tensors", by_kind["missing"])] if by_kind["missing"] else []
    sections += [_listing("unexpected tensors", [stored[n] for n in unexpected])] if unexpected else []
    sections += [_listing("mis-shaped or mis-typed tensors", by_kind["other"])] if by_kind["other"] else []
    sections += [_listing("naming problems", problems)] if problems else []
    if sections:
        bad = len(by_kind["missing"]) + len(by_kind["other"])
        headline = (
            f"{where} does not match the config: {bad} of {len(expected)} tensors missing or wrong "
            "(is it a checkpoint of another model size?)\n"
            if 2 * bad > len(expected)
            else ""
        )
        raise ConversionError(f"{headline}{where}: the checkpoint does not fit the config:\n" + "\n".join(sections))
    return sources
