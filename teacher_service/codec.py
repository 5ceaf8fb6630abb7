"""Tensors on the wire: raw little-endian bytes with a dtype and a shape.

The server encodes torch tensors; clients decode to numpy. numpy has no bfloat16, so
BFLOAT16 payloads decode to float32 exactly (a bfloat16 is the top half of a float32).
"""

from __future__ import annotations

import numpy as np
import torch

from teacher_service.proto import teacher_pb2 as pb

# name -> (wire enum, numpy little-endian dtype of the payload, torch dtype)
_DTYPES: dict[str, tuple[int, str, torch.dtype]] = {
    "float32": (pb.FLOAT32, "<f4", torch.float32),
    "float16": (pb.FLOAT16, "<f2", torch.float16),
    "bfloat16": (pb.BFLOAT16, "<u2", torch.bfloat16),
    "int32": (pb.INT32, "<i4", torch.int32),
    "int64": (pb.INT64, "<i8", torch.int64),
}
_BY_ENUM = {enum: name for name, (enum, _, _) in _DTYPES.items()}
LOGPROB_DTYPES = ("float32", "float16", "bfloat16")


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
        return _DTYPES[name][0]
    except KeyError:
        raise CodecError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name][2]


def encode_torch(tensor: torch.Tensor) -> pb.Tensor:
    """A CPU torch tensor -> wire Tensor (dtype taken from the tensor)."""
    name = next((n for n, (_, _, t) in _DTYPES.items() if t == tensor.dtype), None)
    if name is None:
        raise CodecError(f"no wire dtype for torch {tensor.dtype}")
    enum, np_dtype, _ = _DTYPES[name]
    tensor = tensor.detach().cpu().contiguous()
    if name == "bfloat16":
        tensor = tensor.view(torch.uint16)
    array = tensor.numpy().astype(np_dtype, copy=False)
    return pb.Tensor(dtype=enum, shape=list(tensor.shape), data=array.tobytes())


def encode_numpy(array: np.ndarray, name: str) -> pb.Tensor:
    """A numpy array -> wire Tensor of dtype `name` (not bfloat16: numpy has none)."""
    enum, np_dtype, _ = _DTYPES[name]
    if name == "bfloat16":
        raise CodecError("encode bfloat16 from a torch tensor (encode_torch)")
    array = np.ascontiguousarray(array, dtype=np_dtype)
    return pb.Tensor(dtype=enum, shape=list(array.shape), data=array.tobytes())


def decode_numpy(message: pb.Tensor) -> np.ndarray:
    """Wire Tensor -> numpy array (bfloat16 widened to float32, exactly)."""
    name = dtype_name(message.dtype)
    np_dtype = np.dtype(_DTYPES[name][1])
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"negative dimension in shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if len(message.data) != count * np_dtype.itemsize:
        raise CodecError(
            f"{len(message.data)} bytes do not hold shape {list(shape)} of {name} "
            f"({count * np_dtype.itemsize} bytes expected)"
        )
    array = np.frombuffer(message.data, dtype=np_dtype).reshape(shape)
    if name == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)
