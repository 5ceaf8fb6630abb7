# syntax=docker/dockerfile:1
# The student trainer on CPU: `student-trainer train ...`, or several processes with
# `torchrun --nproc_per_node N -m student_trainer train ...`. Build from the repo root:
#   docker build -f docker/trainer.Dockerfile -t teacher-service-trainer:cpu .
# Student models come from /models (a volume); runs are written under /runs.
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
# /runs belongs to the app user, so a named volume mounted there starts out writable
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir /models /runs && chown 10001:10001 /runs
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY configs configs
USER 10001:10001
VOLUME ["/models", "/runs"]
# its metrics for Prometheus on 9400 (GET /metrics; docker/prometheus.yml scrapes it)
EXPOSE 9400
CMD ["student-trainer", "train", "--config", "/app/configs/compose.yaml", "--resume", "auto", "--metrics-port", "9400"]
