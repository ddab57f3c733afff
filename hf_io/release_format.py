"""How one tensor is stored in a release-layout checkpoint of a given format, and encoding it.

Formats: "bf16" (nothing quantised), "fp8" (as released: FP8 tiles with ue8m0 scales for the
attention, shared-expert and MTP projections, MXFP4 routed experts), "fp8_base" (the Base
checkpoints: FP8 tiles everywhere, routed experts with float32 tile scales).
"""

import numpy as np

from hf_io import quant
from hf_io.release_names import FP4, FP8, ReleaseTensor
from hf_io.safetensors_reader import NUMPY_DTYPES
from hf_io.safetensors_writer import PlannedTensor

BF16, FP8_RELEASE, FP8_BASE = "bf16", "fp8", "fp8_base"
FORMATS = (BF16, FP8_RELEASE, FP8_BASE)


def encoding(tensor: ReleaseTensor, fmt: str) -> str:
    """ "plain", "fp8_tiles", "fp8_float_tiles" or "mxfp4" for `tensor` in format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not allowed; allowed: {FORMATS}")
    if fmt == BF16 or tensor.storage not in (FP8, FP4):
        return "plain"
    if tensor.storage == FP4:
        return "mxfp4" if fmt == FP8_RELEASE else "fp8_float_tiles"
    return "fp8_tiles"


def plan(tensor: ReleaseTensor, fmt: str) -> list:
    """The PlannedTensors (weight, then its scale if quantised) of `tensor` in `fmt`."""
    shape = tuple(tensor.shape)
    kind = encoding(tensor, fmt)
    if kind == "plain":
        return [PlannedTensor(tensor.name, tensor.dtype, shape)]
    if kind == "mxfp4":
        return [
            PlannedTensor(tensor.name, "I8", quant.fp4_packed_shape(shape)),
            PlannedTensor(tensor.scale_name, "F8_E8M0", quant.fp4_scale_shape(shape)),
        ]
    scale_dtype = "F32" if kind == "fp8_float_tiles" else "F8_E8M0"
    return [
        PlannedTensor(tensor.name, "F8_E4M3", shape),
        PlannedTensor(tensor.scale_name, scale_dtype, quant.tile_grid(shape)),
    ]


def encode(tensor: ReleaseTensor, value: np.ndarray, fmt: str) -> list:
    """`value` in the release layout -> the arrays of `plan(tensor, fmt)`, in that order."""
    kind = encoding(tensor, fmt)
    if kind == "mxfp4":
        packed, exponents = quant.encode_fp4(np.asarray(value, np.float32), tensor.name)
        return [packed, exponents]
    if kind == "fp8_tiles":
        codes, exponents = quant.encode_fp8(np.asarray(value, np.float32), tensor.name)
        return [codes, exponents]
    if kind == "fp8_float_tiles":
        return list(quant.encode_fp8_float_scales(np.asarray(value, np.float32), tensor.name))
    return [np.asarray(value).astype(NUMPY_DTYPES[tensor.dtype])]


def random_codes(tensor: ReleaseTensor, fmt: str, rng: np.random.Generator) -> list | None:
    """Random stored bytes for a quantised tensor in `fmt` (no NaN codes, scales near 2^-6), or None
    for a plain one: fast filler for large benchmark checkpoints."""
    planned = plan(tensor, fmt)
    if len(planned) == 1:
        return None
    weight, scale = planned
    codes = rng.integers(0, 256, weight.shape, dtype=np.uint8)
    if weight.dtype == "F8_E4M3":
        codes[(codes & 0x7F) == 0x7F] = 0  # e4m3fn's NaN encodings
    scales = rng.integers(quant.UE8M0_BIAS - 8, quant.UE8M0_BIAS - 4, scale.shape, dtype=np.uint8)
    if scale.dtype == "F32":
        scales = quant.ue8m0_to_float(scales)
    return [codes.view(NUMPY_DTYPES[weight.dtype]), scales]
