#!/usr/bin/env bash
# Every GPU measurement of bench/bench_service.py and bench/bench_trainer.py, written as JSON
# to results/gpu/, in under 8 minutes on one GPU (each step prints its elapsed time).
#
#   bench/gpu.sh                  # on the GPU machine, from the repository root of a copy
#   bench/gpu.sh fetch-wheels     # beforehand, on a machine WITH network (see Dependencies)
#   GPU_SH_DEVICE=cpu PYTHON=.venv/bin/python bench/gpu.sh    # a dry run on CPU, tiny shapes
#
# What it measures (docs/design.md "Performance targets"; issues 14 and 26). Every server
# runs with the server's default admission flags (the benches size --max-batch-tokens to
# their shapes and start the variants they compare: --full-logits, --no-share-prefixes, ...):
# 1. results/gpu/bench_cuda_1b_shapes.json: the 0.81B Llama of bench_cuda_1b.json (hidden
#    2048, 16 layers, vocabulary 32000, bf16), every section of bench_service.py on it:
#    - base: the service against a bare forward, 32 x 512 tokens every row scored
#      (target >= 0.85; 0.58 before the new path), and in process the forward + the
#      scoring math (target >= 0.9; 0.74 before issue 26's device-side math) and the
#      backend's score_batch against the same forward; 8 clients against 1, bytes per token;
#    - prompt-heavy: 32 x (384 prompt + 128 completion) scored from the completion: the
#      service on today's path (serve --full-logits), on the new path, and the in-process
#      limit (body + output layer on the scored rows + top-k). The 1.7x target is the CPU
#      one (a hidden-256 model there); with hidden 2048 the output layer is under a tenth
#      of the forward, so on this model expect much less from skipping the prompt rows;
#    - groups: 4 prompts x 8 samples, shared prompts against serve --no-share-prefixes.
#    Peak GPU memory: the bench's in-process torch.cuda.max_memory_allocated per section,
#    and each server's memory as nvidia-smi reports it (allocator cache included).
# 2. results/gpu/bench_cuda_qwen05b_shapes.json: the same sections (2 rounds) on a teacher
#    of Qwen2-0.5B's shape (bench_service.py's preset qwen2-0.5b: vocabulary 151936, hidden
#    896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, tied embeddings; random
#    weights, bf16): a 152k vocabulary, where the output layer is a quarter of the weights.
# 3. results/gpu/trainer_cuda_qwen05b.json: the student trainer on CUDA (bench_trainer.py
#    --service-only): a student of the same shape at random initialisation (the teacher's
#    model directory: the step's cost does not depend on the weights) trained in float32
#    under bf16 autocast (student.autocast=bf16), 8 prompts x <= 64 new tokens, top-64
#    generalized JSD, against the teacher service on the same GPU (bf16, default flags),
#    synchronous and with steps built ahead (rollout.max_staleness 1): seconds per step
#    after 2 warmup steps, the trainer's peak CUDA memory, the server's GPU memory.
# 4. results/gpu/bench_cuda_small_shapes.json: bench_cuda_small.json's command (12.5M
#    model, fp32) with the default shapes of every section, prompt-heavy on the hidden-256
#    vocabulary-32k model of the CPU figures. Skipped when steps 1-3 left under 3 minutes
#    of the 8 (GPU_SH_SMALL=0 skips it, 1 forces it).
# The models are built under .cache/ on first use (random weights; the 0.81B one in about a
# minute), so a fresh machine spends its first minutes there.
#
# Environment:
#   PYTHON         the interpreter (default /opt/torch/.venv/bin/python3: the GPU image's
#                  Python 3.12 with torch, as in results/gpu/*.json's "command")
#   RESULTS        where the JSON goes (default results/gpu; the dry run: /tmp/gpu-sh-dry).
#                  On the device tool, RESULTS=$OUT brings them back, or copy them there.
#   GPU_SH_DEVICE  cuda (default) or cpu: the dry run (tiny shapes, one round; checks the
#                  arguments and the plumbing, measures nothing worth keeping)
#   GPU_SITE       a folder of extra packages, put first on PYTHONPATH (default: the wheels
#                  below, unpacked into /tmp/gpu-site)
#   WHEELS         the wheels folder (default .cache/gpu-wheels); GPU_SH_WHEELS=0 ignores it
#                  (the dry run's default: its interpreter has the packages; 1 unpacks them)
#
# Dependencies. This script installs nothing and needs no network: the GPU machine has
# none. The repository is used in place (PYTHONPATH = the root and teacher-client/, no pip
# install -e). The GPU image (bench/gpu-image-packages.txt) provides torch and most of what
# the code imports, but lacks some packages and has others too old for the project's
# requirements: bench/gpu-wheels.txt pins them to the local .venv's versions (derived by
# bench/gpu_wheels.py from the installed distributions' requirement closure; checked by
# tests/test_gpu_script.py against every import of the code this script runs). They travel
# as wheels (nothing of the local .venv does: it is Python 3.11, the image 3.12):
#   1. here, with network:   bench/gpu.sh fetch-wheels    (pip download, cp312 x86-64)
#   2. on the device tool:   carry [".cache/gpu-wheels"], command "bench/gpu.sh"
# This script unpacks the pinned wheels that fit its Python into /tmp/gpu-site with
# zipfile (no pip), puts that folder first on PYTHONPATH, and checks (bench/gpu_check.py)
# every pin's version and every import of the code it runs before measuring; if one is
# missing it says which and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${GPU_SH_DEVICE:-cuda}
PYTHON=${PYTHON:-/opt/torch/.venv/bin/python3}
WHEELS=${WHEELS:-.cache/gpu-wheels}
if [[ $DEVICE == cpu ]]; then RESULTS=${RESULTS:-/tmp/gpu-sh-dry}; else RESULTS=${RESULTS:-results/gpu}; fi

WHEELS_LIST=bench/gpu-wheels.txt
mapfile -t WANTED < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$WHEELS_LIST")

if [[ ${1:-} == fetch-wheels ]]; then
  # Run this where there is network, never on the GPU machine: it downloads (does not
  # install) the wheels for the GPU image's CPython 3.12 on x86-64. A pin with no such
  # wheel on the index (docopt: an sdist only) is built into one here, if it is pure Python.
  PIP=("${PIP_PYTHON:-python3}" -m pip --disable-pip-version-check)
  mkdir -p "$WHEELS"
  for pin in "${WANTED[@]}"; do
    if ! "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" "$pin"; then
      echo "  $pin: no CPython 3.12 x86-64 wheel on the index; building a pure-Python one"
      "${PIP[@]}" wheel --quiet --no-deps --no-binary=:all: -w "$WHEELS" "$pin"
    fi
  done
  "${PIP_PYTHON:-python3}" bench/gpu_wheels.py verify "$WHEELS"  # a built one must be pure
  du -sh "$WHEELS"
  exit 0
fi
if [[ $# -gt 0 ]]; then
  echo "usage: bench/gpu.sh [fetch-wheels]" >&2
  exit 2
fi

START=$SECONDS
elapsed() { echo "[gpu.sh] $1 ($((SECONDS - START)) s elapsed)"; }

# --- the interpreter and its packages -----------------------------------------------------
if [[ ! -x $PYTHON ]]; then
  echo "bench/gpu.sh: no interpreter at $PYTHON (set PYTHON)" >&2
  exit 1
fi
if [[ $DEVICE == cpu ]]; then USE_WHEELS=${GPU_SH_WHEELS:-0}; else USE_WHEELS=${GPU_SH_WHEELS:-1}; fi
if [[ -z ${GPU_SITE:-} && $USE_WHEELS != 0 ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  GPU_SITE=/tmp/gpu-site
  rm -rf "$GPU_SITE"
  "$PYTHON" bench/gpu_wheels.py unpack "$WHEELS" "$GPU_SITE"
fi
export PYTHONPATH="${GPU_SITE:+$GPU_SITE:}$PWD:$PWD/teacher-client${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# every pin at its version, every module and every third-party import of the code run below
"$PYTHON" bench/gpu_check.py "$DEVICE"
elapsed "packages checked"
mkdir -p "$RESULTS"

# --- the measurements ---------------------------------------------------------------------
BENCH=("$PYTHON" bench/bench_service.py)
TRAIN=("$PYTHON" bench/bench_trainer.py)
if [[ $DEVICE == cpu ]]; then  # the dry run: the same flags, tiny shapes, one round
  SHAPES=(--batch-size 2 --seq-len 64 --reps 1 --rounds 1 --clients 2 --small-requests 2
    --ph-model base --ph-batch 2 --group-model base --groups 1 --samples 4
    --prompt-len 48 --completion-len 16 --shape-reps 1)
  BIG=(--device cpu --dtype float32 --hidden-size 128 --layers 2 --vocab-size 4000 "${SHAPES[@]}")
  QWEN=(--device cpu --dtype float32 --model qwen2-tiny "${SHAPES[@]}")
  TRAINER=(--device cpu --autocast bf16 --teacher-model qwen2-tiny --student-model qwen2-tiny
    --service-only --rounds 1 --steps 1 --batch-size 2 --max-new-tokens 8)
  SMALL=(--device cpu --quick --rounds 1 --reps 1 --small-requests 2 --shape-reps 1
    --ph-batch 2 --samples 4 --prompt-len 48 --completion-len 16)
  NAMES=("dry run 1 (tiny model)" "dry run 2 (a tiny body, Qwen2's vocabulary)"
    "dry run 3 (the trainer, tiny)" "dry run 4 (default models, tiny shapes)")
else
  BIG=(--device cuda --dtype bfloat16 --hidden-size 2048 --layers 16 --vocab-size 32000
    --batch-size 32 --seq-len 512 --rounds 3 --small-requests 16
    --ph-model base --ph-batch 32 --group-model base --groups 4 --shape-reps 4)
  QWEN=(--device cuda --dtype bfloat16 --model qwen2-0.5b --batch-size 32 --seq-len 512
    --rounds 2 --small-requests 16 --ph-model base --ph-batch 32 --group-model base
    --groups 4 --shape-reps 2)
  TRAINER=(--device cuda --dtype bfloat16 --autocast bf16 --teacher-model qwen2-0.5b
    --student-model qwen2-0.5b --service-only --rounds 1 --steps 4 --batch-size 8
    --max-new-tokens 64)
  SMALL=(--device cuda --rounds 3)
  NAMES=("0.81B bf16: every section" "Qwen2-0.5B shape bf16: every section"
    "the trainer, Qwen2-0.5B shape, bf16 autocast" "12.5M fp32: every section")
fi

"${BENCH[@]}" "${BIG[@]}" --json "$RESULTS/bench_cuda_1b_shapes.json"
elapsed "${NAMES[0]}"

"${BENCH[@]}" "${QWEN[@]}" --json "$RESULTS/bench_cuda_qwen05b_shapes.json"
elapsed "${NAMES[1]}"

"${TRAIN[@]}" "${TRAINER[@]}" --json "$RESULTS/trainer_cuda_qwen05b.json"
elapsed "${NAMES[2]}"

if [[ ${GPU_SH_SMALL:-} == 1 || (${GPU_SH_SMALL:-} != 0 && $((SECONDS - START)) -lt 300) ]]; then
  "${BENCH[@]}" "${SMALL[@]}" --json "$RESULTS/bench_cuda_small_shapes.json"
  elapsed "${NAMES[3]}"
else
  elapsed "${NAMES[3]} skipped (GPU_SH_SMALL=${GPU_SH_SMALL:-}, or too little of the 8 minutes left)"
fi
ls -l "$RESULTS"/*.json
