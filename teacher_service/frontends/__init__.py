"""The service's front ends: each turns its own wire format into the engine's plain
requests (requests.py) and the engine's answers and errors back into its own.

  grpc_api.py  gRPC (teacher.v1.Teacher, the contract in protos/): protos <-> requests,
               the servicer and the one error handler
  zmq_api.py   ZeroMQ for verl's teacher client (its msgpack framing)
  http/        HTTP: the native API and the vLLM / OpenAI and TGI dialects, /metrics and
               the /dashboard page (http/__init__.py lists its modules)

A new front end or HTTP dialect is a module here that calls the Engine; nothing below
it changes (docs/design.md, "Module map").
"""
