"""The server's side of the wire codec: torch tensors in, wire Tensors out, id tensors in.

Decoding, dtype names and their enums live in the client package (teacher_client.codec,
numpy only); this adds what needs torch (the torch dtype of a wire name, and encoding) and
the decoding of the one tensor requests carry (candidate ids) into a RequestError.
"""

from __future__ import annotations

import numpy as np
import torch

from teacher_client.codec import CodecError, decode_numpy, dtype_name, encode_raw
from teacher_client.proto import teacher_pb2 as pb
from teacher_service.errors import RequestError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def wire_name(dtype: torch.dtype) -> str:
    """The wire dtype's name for a torch dtype ("float32", ...)."""
    name = next((n for n, t in TORCH_DTYPES.items() if t == dtype), None)
    if name is None:
        raise CodecError(f"no wire dtype for torch {dtype}")
    return name


def encode_torch(tensor: torch.Tensor) -> pb.Tensor:
    """A torch tensor -> wire Tensor (dtype taken from the tensor; bfloat16 as its bits)."""
    name = wire_name(tensor.dtype)
    tensor = tensor.detach().cpu().contiguous()
    if name == "bfloat16":
        tensor = tensor.view(torch.uint16)
    # numpy arrays from torch are native-endian; the wire is little-endian
    array = tensor.numpy()
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return encode_raw(array.tobytes(), list(tensor.shape), name)


def decode_ids(message: pb.Tensor, field: str) -> np.ndarray:
    """A wire tensor of token ids (INT32 or INT64), or a RequestError naming `field`."""
    try:
        name = dtype_name(message.dtype)
        if name not in ("int32", "int64"):
            raise CodecError(f"dtype {name}: candidate ids must be INT32 or INT64")
        return decode_numpy(message)
    except CodecError as error:
        raise RequestError(f"{field}: {error}", field=field) from None
