"""The HTTP front end: a FastAPI app on the engine that the gRPC servicer uses too.

app.py     the app: routers, error bodies, /health, /metrics, request metrics
native.py  /v1/score, /v1/generate, /v1/info: the gRPC calls in JSON or msgpack
openai.py  the vLLM/OpenAI dialect: /v1/completions (prompt_logprobs, echo + logprobs)
tgi.py     the TGI dialect: /generate, /info (decoder_input_details prefill log-probs)
server.py  uvicorn in the service's own event loop
"""
