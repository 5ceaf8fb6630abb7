"""Tensors on the wire: raw little-endian bytes with a dtype and a shape (docs/design.md).

numpy only, so any trainer can decode a response without torch. numpy has no bfloat16:
a bfloat16 is the top half of a float32, so BFLOAT16 payloads decode to float32 exactly
(shift each 16-bit word left by 16 and reinterpret the 32 bits).
"""

from __future__ import annotations

import math

import numpy as np

from teacher_client.proto import teacher_pb2 as pb

# name -> (wire enum, numpy little-endian dtype of the payload)
WIRE_DTYPES: dict[str, tuple[int, str]] = {
    "float32": (pb.FLOAT32, "<f4"),
    "float16": (pb.FLOAT16, "<f2"),
    "bfloat16": (pb.BFLOAT16, "<u2"),
    "int32": (pb.INT32, "<i4"),
    "int64": (pb.INT64, "<i8"),
}
_BY_ENUM = {enum: name for name, (enum, _) in WIRE_DTYPES.items()}
LOGPROB_DTYPES = ("float32", "float16", "bfloat16")
MAX_DIMS = 32  # numpy 1.x's limit (2.x allows 64); the API's tensors have at most 2


class CodecError(ValueError):
    """A tensor whose dtype, shape and byte length do not agree."""


def dtype_name(enum_value: int) -> str:
    """The dtype's name for a wire enum value; CodecError for an unknown one."""
    try:
        return _BY_ENUM[enum_value]
    except KeyError:
        raise CodecError(f"unknown dtype enum value {enum_value}") from None


def dtype_enum(name: str) -> int:
    try:
        return WIRE_DTYPES[name][0]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r}; expected one of {sorted(WIRE_DTYPES)}") from None


def encode_raw(data: bytes, shape: list[int], name: str) -> pb.Tensor:
    """Bytes already in the wire layout -> Tensor (the server's torch encoder uses it)."""
    return pb.Tensor(dtype=dtype_enum(name), shape=shape, data=data)


def encode_numpy(array: np.ndarray, name: str) -> pb.Tensor:
    """A numpy array -> wire Tensor of dtype `name` (not bfloat16: numpy has none)."""
    if name == "bfloat16":
        raise CodecError("numpy has no bfloat16: send float32 or float16")
    array = np.ascontiguousarray(array, dtype=WIRE_DTYPES[name][1])
    return encode_raw(array.tobytes(), list(array.shape), name)


def decode_numpy(message: pb.Tensor) -> np.ndarray:
    """Wire Tensor -> numpy array (bfloat16 widened to float32, exactly)."""
    name = dtype_name(message.dtype)
    np_dtype = np.dtype(WIRE_DTYPES[name][1])
    shape = tuple(message.shape)
    if len(shape) > MAX_DIMS:
        raise CodecError(f"shape has {len(shape)} dimensions, over the {MAX_DIMS} numpy holds")
    if any(d < 0 for d in shape):
        raise CodecError(f"negative dimension in shape {list(shape)}")
    count = math.prod(shape)  # Python ints: [2**32, 2**32] must not wrap to 0 as int64 does
    if len(message.data) != count * np_dtype.itemsize:
        raise CodecError(
            f"{len(message.data)} bytes do not hold shape {list(shape)} of {name} "
            f"({count * np_dtype.itemsize} bytes expected)"
        )
    try:
        array = np.frombuffer(message.data, dtype=np_dtype).reshape(shape)
    except ValueError as error:  # numpy's own limits, e.g. shape [0, 2**62]: "too big"
        raise CodecError(f"shape {list(shape)}: {error}") from None
    if name == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)
