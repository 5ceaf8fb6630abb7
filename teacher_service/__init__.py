"""Teacher-as-a-service: exact per-token teacher log-probabilities over gRPC.

The server (`teacher-service serve`) loads a local Hugging Face causal LM and scores token
sequences submitted by student trainers; `teacher_client.TeacherClient` (the separate,
torch-free teacher-client distribution) is the library trainers call it with.

Modules (a request's path: front end -> requests -> engine -> validation -> batcher ->
backend, and back):
  server.py       lifecycle: the engine plus the front ends; serve(), BackgroundServer
  grpc_api.py     the gRPC front end: protos <-> requests, the servicer, its error handler
  web/            the HTTP front end: native API, vLLM/OpenAI and TGI dialects
  requests.py     the engine's plain request types and the caller's field names
  engine.py       validation, the batcher and the backend, shared by every front end
  validation.py   requests -> checked work items, or errors naming the caller's field
  errors.py       error kinds and the one table of their gRPC codes and HTTP statuses
  batcher.py      dynamic batching of sequences on the one model worker thread
  backend_api.py  the Backend protocol, Capability, ScoreItem, ScoredBatch
  backend.py      HFBackend: a local transformers model
  remote.py       OpenAIBackend / TGIBackend: an upstream server as the model
  scoring.py      the log-prob math;  sampling.py: KV-cache sampling
  codec.py        torch tensors <-> wire tensors
  in_process.py   the teacher in the trainer's own process
  auth.py, config.py, metrics.py, cli.py
"""

__version__ = "0.1.0"
