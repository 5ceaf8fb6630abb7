"""The HTTP front end: a FastAPI app on the engine that the gRPC front end uses too.

app.py     the app: the dialects' routers, /health, /metrics, request metrics
body.py    reading a body: size limit, JSON or msgpack, schema (each dialect words errors)
errors.py  the one HTTP error handler: exception -> status (errors.STATUS), message, field
native.py  /v1/score, /v1/generate, /v1/info: the gRPC calls in JSON or msgpack
openai.py  the vLLM/OpenAI dialect: /v1/completions (prompt_logprobs, echo + logprobs)
openai_chat.py  its chat form: /v1/chat/completions, the teacher's chat template
openai_errors.py  the dialect's OpenAI-shaped errors, and the 404 of an unknown /v1/ route
tgi.py     the TGI dialect: /generate, /info (decoder_input_details prefill log-probs)
dashboard.py  GET /dashboard: a live page of the main charts (static/), and its data
dashboard_data.py  that data: a JSON snapshot of the metrics registry /metrics renders
server.py  uvicorn in the service's own event loop

Each dialect module is laid out as vLLM's entrypoints are: its bodies with `to_...()`
conversions into the engine's requests (requests.py), serving functions that turn the
engine's results into its response, and a thin router. Dialects import app.py's
neighbours, never app.py, so nothing imports back what imports it.
"""
