"""Teacher-as-a-service: exact per-token teacher log-probabilities over gRPC.

The server (`teacher-service serve`) loads a local Hugging Face causal LM and scores token
sequences submitted by student trainers; `teacher_client.TeacherClient` (the separate,
torch-free teacher-client distribution) is the library trainers call it with.

Modules (a request's path: front end -> requests -> engine -> validation -> batcher ->
backend, and back; docs/design.md, "Module map and request path"):
  server.py       lifecycle: the engine plus the front ends; serve(), BackgroundServer
  frontends/      gRPC (grpc_api.py), ZeroMQ for verl (zmq_api.py), HTTP (http/: native API,
                  vLLM/OpenAI and TGI dialects, /metrics, /dashboard)
  requests.py     the engine's plain request types and the caller's field names
  deadlines.py    the caller's deadline and connection, from the front end to the batcher
  engine.py       validation, the batcher and the backend, shared by every front end
  validation.py   requests -> checked work items, or errors naming the caller's field
  errors.py       error kinds and the one table of their gRPC codes and HTTP statuses
  batcher.py      dynamic batching of sequences on the one model worker thread
  capacity.py     the model's measured speed by forward size: every bound's unit
  heap.py         start-up's objects frozen out of garbage collection; collections timed
  backend_api.py  the Backend protocol, Capability, ScoreItem, ScoredBatch
  backend.py      HFBackend: a local transformers model; forward.py: its forwards
  remote.py       OpenAIBackend / TGIBackend: an upstream server as the model
  scoring.py      the log-prob math, a chunk of rows at a time
  codec.py        torch tensors <-> wire tensors
  in_process.py   the teacher in the trainer's own process
  auth.py, config.py, flags.py, metrics.py, cli.py
The model kernels it shares with the trainer (sampling, output layer, devices, threads)
are causal_lm's.
"""

__version__ = "0.1.0"
