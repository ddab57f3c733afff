"""The release's block-quantised formats, encoded and decoded with NumPy and ml_dtypes.

FP8: e4m3fn codes, one ue8m0 scale per 128x128 tile (partial tiles at the edges), or a float32 scale
per tile in the Base checkpoints. MXFP4: e2m1 codes packed two per byte (low nibble = even input
column), one ue8m0 scale per 32 consecutive inputs of a row. A ue8m0 byte b means 2^(b - 127).

Both decodes are exact in bfloat16. Encoding picks the power-of-two scale 2^ceil(log2(amax / max
code)) and rounds to nearest; a second pass over the decoded values then gives the canonical
encoding (the smallest exact scale), so encode(decode(x)) == x for everything encode writes.
"""

import ml_dtypes
import numpy as np

FP8_TILE = 128
FP4_BLOCK = 32
UE8M0_BIAS = 127
UE8M0_NAN = 255
E4M3_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
E2M1_MAX = float(ml_dtypes.finfo(ml_dtypes.float4_e2m1fn).max)  # 6
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)

_E2M1_VALUES = np.arange(16, dtype=np.uint8).view(E2M1).astype(np.float32)
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
_DECODE_TABLES: dict = {}


class QuantError(ValueError):
    pass


def tile_grid(shape) -> tuple:
    """[out, in] -> the FP8 scale grid [ceil(out/128), ceil(in/128)]."""
    return tuple(-(-n // FP8_TILE) for n in shape)


def fp4_packed_shape(shape) -> tuple:
    """[out, in] -> the packed code bytes [out, in/2]."""
    return shape[0], shape[1] // 2


def fp4_scale_shape(shape) -> tuple:
    """[out, in] -> the MXFP4 scale grid [out, in/32]."""
    return shape[0], shape[1] // FP4_BLOCK


def ue8m0_to_float(exponents: np.ndarray) -> np.ndarray:
    """Raw ue8m0 bytes -> float32 powers of two (255 -> NaN, as the format defines)."""
    exponents = np.asarray(exponents).view(np.uint8)
    scale = np.ldexp(np.float32(1), exponents.astype(np.int32) - UE8M0_BIAS).astype(np.float32)
    return np.where(exponents == UE8M0_NAN, np.float32(np.nan), scale)


def _decode_table(kind: str, dtype) -> np.ndarray:
    """(scale byte << 8 | code byte) -> decoded value(s) in `dtype`, so decoding is one 1-d gather
    per byte. For "fp4" an entry holds the pair (low nibble, high nibble) viewed as one unsigned
    integer of twice the width; for "fp8" one value. Computed in float64 (exact), rounded once."""
    key = (kind, np.dtype(dtype))
    if key not in _DECODE_TABLES:
        with np.errstate(over="ignore", invalid="ignore"):
            scales = ue8m0_to_float(np.arange(256, dtype=np.uint8)).astype(np.float64)
            codes = np.arange(256)
            if kind == "fp4":
                values = np.stack([_E2M1_VALUES[codes & 0xF], _E2M1_VALUES[codes >> 4]], axis=1)
                table = (scales[:, None, None] * values[None]).astype(np.float32).astype(dtype)
                table = table.reshape(-1, 2).view(f"u{2 * np.dtype(dtype).itemsize}").reshape(-1)
            else:
                table = (scales[:, None] * _E4M3_VALUES[None]).astype(np.float32).astype(dtype).reshape(-1)
        _DECODE_TABLES[key] = table
    return _DECODE_TABLES[key]


def _table_index(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """scale bytes broadcast against code bytes -> the uint16 index (scale << 8 | code)."""
    return (scales.view(np.uint8).astype(np.uint16) << 8) | codes.view(np.uint8)


def _power_of_two_exponents(amax: np.ndarray, max_code: float) -> np.ndarray:
    """Biased exponents b with amax / 2^(b-127) <= max_code, b as small as that allows; all-zero
    blocks get 2^0. Computed exactly with frexp, not with a float log2."""
    ratio = amax.astype(np.float64) / max_code
    mantissa, exponent = np.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    ceil_log2 = np.where(mantissa == 0.5, exponent - 1, exponent)
    biased = np.where(amax > 0, ceil_log2 + UE8M0_BIAS, UE8M0_BIAS)
    return np.clip(biased, 0, UE8M0_NAN - 1).astype(np.uint8)


def _tiles(x: np.ndarray) -> np.ndarray:
    """[out, in] -> [out_tiles, 128, in_tiles, 128], zero-padded at the far edges."""
    rows, cols = tile_grid(x.shape)
    padded = np.zeros((rows * FP8_TILE, cols * FP8_TILE), x.dtype)
    padded[: x.shape[0], : x.shape[1]] = x
    return padded.reshape(rows, FP8_TILE, cols, FP8_TILE)


def _untile(tiles: np.ndarray, shape) -> np.ndarray:
    rows, _, cols, _ = tiles.shape
    return tiles.reshape(rows * FP8_TILE, cols * FP8_TILE)[: shape[0], : shape[1]]


def _check_2d(what: str, x: np.ndarray):
    if x.ndim != 2:
        raise QuantError(f"{what}: expected a 2-d [out, in] matrix, got shape {x.shape}")


def decode_fp8(codes: np.ndarray, scales: np.ndarray, what: str = "tensor", dtype=np.float32) -> np.ndarray:
    """e4m3 codes [out, in] with per-tile scales [ceil(out/128), ceil(in/128)] (ue8m0 bytes or
    float32) -> `dtype` [out, in]. ue8m0 products are exact in float32 and bfloat16."""
    _check_2d(what, codes)
    if tuple(scales.shape) != tile_grid(codes.shape):
        raise QuantError(
            f"{what}: scale shape {tuple(scales.shape)} does not match the 128x128 tile grid "
            f"{tile_grid(codes.shape)} of weight shape {tuple(codes.shape)}"
        )
    if scales.dtype == np.float32:
        values = _tiles(codes.view(E4M3).astype(np.float32)) * scales[:, None, :, None]
        return _untile(values, codes.shape).astype(dtype)
    index = _table_index(scales[:, None, :, None], _tiles(codes.view(np.uint8)))
    return _untile(_decode_table("fp8", dtype)[index], codes.shape)


def _encode_fp8_once(x: np.ndarray):
    tiles = _tiles(np.asarray(x, np.float32))
    exponents = _power_of_two_exponents(np.abs(tiles).max(axis=(1, 3)), E4M3_MAX)
    scaled = tiles / ue8m0_to_float(exponents)[:, None, :, None]
    codes = np.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return _untile(codes, x.shape), exponents


def encode_fp8(x: np.ndarray, what: str = "tensor"):
    """float [out, in] -> (e4m3 codes [out, in], ue8m0 bytes [ceil(out/128), ceil(in/128)])."""
    _check_2d(what, x)
    codes, exponents = _encode_fp8_once(x)
    return _encode_fp8_once(decode_fp8(codes, exponents, what))


def encode_fp8_float_scales(x: np.ndarray, what: str = "tensor"):
    """float [out, in] -> (e4m3 codes, float32 scales per 128x128 tile = amax / 448), the Base
    checkpoints' expert format; decode_fp8 reads it back (to within e4m3 rounding)."""
    _check_2d(what, x)
    tiles = _tiles(np.asarray(x, np.float32))
    amax = np.abs(tiles).max(axis=(1, 3))
    scales = np.where(amax > 0, amax / E4M3_MAX, 1).astype(np.float32)
    codes = np.clip(tiles / scales[:, None, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return _untile(codes, x.shape), scales


def _check_fp4_shapes(what: str, packed_shape, scales_shape):
    out, half = packed_shape
    if tuple(scales_shape) != (out, 2 * half // FP4_BLOCK) or (2 * half) % FP4_BLOCK:
        raise QuantError(
            f"{what}: scale shape {tuple(scales_shape)} does not fit packed FP4 shape "
            f"{tuple(packed_shape)} (one scale per {FP4_BLOCK} inputs: expected "
            f"{(out, 2 * half // FP4_BLOCK)})"
        )


def decode_fp4(packed: np.ndarray, scales: np.ndarray, what: str = "tensor", dtype=np.float32) -> np.ndarray:
    """Packed e2m1 bytes [out, in/2] (int8 or uint8) with ue8m0 scales [out, in/32] -> `dtype` [out, in]."""
    _check_2d(what, packed)
    _check_fp4_shapes(what, packed.shape, scales.shape)
    out, half = packed.shape
    codes = packed.view(np.uint8).reshape(out, scales.shape[1], FP4_BLOCK // 2)
    pairs = _decode_table("fp4", dtype)[_table_index(scales[:, :, None], codes)]
    return pairs.view(dtype).reshape(out, 2 * half)


def _encode_fp4_once(x: np.ndarray):
    out, cols = x.shape
    blocks = np.asarray(x, np.float32).reshape(out, cols // FP4_BLOCK, FP4_BLOCK)
    exponents = _power_of_two_exponents(np.abs(blocks).max(axis=2), E2M1_MAX)
    scaled = blocks / ue8m0_to_float(exponents)[:, :, None]
    codes = np.clip(scaled, -E2M1_MAX, E2M1_MAX).astype(E2M1).view(np.uint8).reshape(out, cols // 2, 2)
    packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).astype(np.uint8)
    return packed.view(np.int8), exponents


def encode_fp4(x: np.ndarray, what: str = "tensor"):
    """float [out, in] (in a multiple of 32) -> (packed int8 [out, in/2], ue8m0 bytes [out, in/32])."""
    _check_2d(what, x)
    if x.shape[1] % FP4_BLOCK:
        raise QuantError(f"{what}: input dim {x.shape[1]} is not a multiple of the FP4 block {FP4_BLOCK}")
    packed, exponents = _encode_fp4_once(x)
    return _encode_fp4_once(decode_fp4(packed, exponents, what))
