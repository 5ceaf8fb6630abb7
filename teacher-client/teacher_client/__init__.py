"""teacher-client: call a teacher service from any trainer, without torch.

    from teacher_client import ScoreOptions, TeacherClient

    client = TeacherClient("localhost:50051")
    client.check_tokenizer(tokenizer)          # refuses a teacher that means other tokens
                                               # (LocalTokenizer.from_dir: no transformers)
    results = client.score(sequences, score_from, ScoreOptions(top_k=64))
    results[0].topk_logprobs                   # numpy [T, 64]

Depends on grpcio, gRPC's health-checking stubs, protobuf and numpy only. The scoring
semantics and the wire format are in docs/design.md of the teacher-service repository.

Modules:
  client.py       TeacherClient / AsyncTeacherClient: deadlines, retries, streams, health
  pipeline.py     a ScoreStream's window, order and resends after back-pressure
  messages.py     plain Python <-> proto: ScoreOptions, requests, results, the handshake
  codec.py        tensors on the wire <-> numpy
  pool.py         one replica or a pool, round robin over the healthy ones
  retry.py        RetryPolicy: UNAVAILABLE only, backoff with jitter, within the deadline
  auth.py         bearer metadata, TLS channel credentials
  fingerprint.py  the tokenizer fingerprint; tokenizer.py: the handshake without transformers
  objectives.py   a loss as an Objective chosen by name (needs torch; not imported here)
  losses.py       the divergence core (needs torch; not imported here)
  trl.py          the TRL adapter (the `trl` extra; not imported here)
  proto/          generated from protos/teacher.proto
"""

from teacher_client.client import (
    DEFAULT_TIMEOUT,
    AsyncTeacherClient,
    TeacherClient,
    TeacherServiceError,
)
from teacher_client.codec import CodecError, decode_numpy, encode_numpy
from teacher_client.fingerprint import tokenizer_fingerprint
from teacher_client.messages import (
    GenerateResult,
    ScoreOptions,
    ScoreResult,
    TeacherInfo,
    TokenizerMismatchError,
    build_generate_request,
    build_score_request,
    compare_tokenizer,
)
from teacher_client.retry import RetryPolicy
from teacher_client.tokenizer import LocalTokenizer

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncTeacherClient",
    "CodecError",
    "GenerateResult",
    "LocalTokenizer",
    "RetryPolicy",
    "ScoreOptions",
    "ScoreResult",
    "TeacherClient",
    "TeacherInfo",
    "TeacherServiceError",
    "TokenizerMismatchError",
    "build_generate_request",
    "build_score_request",
    "compare_tokenizer",
    "decode_numpy",
    "encode_numpy",
    "tokenizer_fingerprint",
]
