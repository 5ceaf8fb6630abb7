"""Tensors on the wire: raw little-endian bytes, exact round trips, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_client.codec import CodecError, decode_numpy, encode_numpy
from teacher_client.proto import teacher_pb2 as pb
from teacher_service.codec import encode_torch


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
)
def test_torch_to_numpy_round_trip_is_exact(dtype):
    tensor = (torch.randn(3, 5) * 100).to(dtype)
    message = encode_torch(tensor)
    assert list(message.shape) == [3, 5]
    assert len(message.data) == 15 * tensor.element_size()  # raw bytes, nothing else
    decoded = decode_numpy(message)
    np.testing.assert_array_equal(
        decoded, tensor.float().numpy() if dtype == torch.bfloat16 else tensor.numpy()
    )


def test_bytes_are_little_endian():
    message = encode_torch(torch.tensor([1.0], dtype=torch.float32))
    assert message.data == np.array([1.0], "<f4").tobytes() == b"\x00\x00\x80\x3f"
    ids = encode_numpy(np.array([258]), "int32")
    assert ids.data == b"\x02\x01\x00\x00"


def test_bad_tensors_are_refused():
    with pytest.raises(CodecError, match="bytes do not hold shape"):
        decode_numpy(pb.Tensor(dtype=pb.FLOAT32, shape=[2, 2], data=b"\0" * 12))
    with pytest.raises(CodecError, match="unknown dtype"):
        decode_numpy(pb.Tensor(dtype=42, shape=[1], data=b"\0" * 4))
    with pytest.raises(CodecError, match="negative"):
        decode_numpy(pb.Tensor(dtype=pb.INT32, shape=[-1], data=b""))
