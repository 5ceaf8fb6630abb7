# syntax=docker/dockerfile:1
# The teacher service on CPU. Build from the repository root:
#   docker build -f docker/teacher.Dockerfile -t teacher-service:cpu .
# Models are mounted at /models, never baked in:
#   docker run -p 50051:50051 -p 8000:8000 -v "$PWD/models:/models:ro" teacher-service:cpu
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, the CPU build from PyTorch's own index (PyPI's Linux wheel pulls in CUDA);
# constraints.txt pins the same version, so `pip install .` never replaces it
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==${TORCH_VERSION}
COPY constraints.txt pyproject.toml README.md ./
COPY teacher-client teacher-client
COPY teacher_service teacher_service
COPY student_trainer student_trainer
COPY causal_lm causal_lm
COPY distill_lab distill_lab
RUN pip install -c constraints.txt ./teacher-client . && pip check

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group app && mkdir /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/app
VOLUME ["/models"]
# gRPC and HTTP (/health, /metrics, /v1/score, ...)
EXPOSE 50051 8000
# the gRPC health service (no credentials needed, also with an auth token set)
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["teacher-service", "health", "--address", "127.0.0.1:50051"]
CMD ["teacher-service", "serve", "--model", "/models/records/teacher", \
     "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--device", "cpu", \
     "--dtype", "float32"]
