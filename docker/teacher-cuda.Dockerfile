# syntax=docker/dockerfile:1
# The teacher service on an NVIDIA GPU, on the official PyTorch CUDA runtime image and the
# torch it carries (CUDA 12.6 runs on drivers >= 560, and >= 525 with minor-version
# compatibility; pick another tag with --build-arg BASE_IMAGE=... for other drivers).
#   docker build -f docker/teacher-cuda.Dockerfile -t teacher-service:cuda .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 -v "$PWD/models:/models:ro" \
#     teacher-service:cuda
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# a venv on top of the image's Python: the base's CUDA torch stays the one used, pinned to
# exactly its version so `pip install .` never swaps it for another build
RUN python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch.txt
COPY pyproject.toml README.md ./
COPY teacher-client teacher-client
COPY teacher_service teacher_service
COPY student_trainer student_trainer
COPY causal_lm causal_lm
COPY distill_lab distill_lab
RUN pip install -c /tmp/torch.txt ./teacher-client .

FROM ${BASE_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group app && mkdir /models
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/app
VOLUME ["/models"]
# gRPC and HTTP (/health, /metrics, /v1/score, ...)
EXPOSE 50051 8000
# the gRPC health service (no credentials needed, also with an auth token set)
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["teacher-service", "health", "--address", "127.0.0.1:50051"]
CMD ["teacher-service", "serve", "--model", "/models/records/teacher", \
     "--host", "0.0.0.0", "--port", "50051", "--http-port", "8000", "--device", "cuda", \
     "--dtype", "bfloat16"]
