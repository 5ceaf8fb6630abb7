# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv tgi-client-venv demo test lint proto bench bench-trainer bench-http clean

venv: $(STAMP)

# torch first and pinned (constraints.txt): the CPU build on local disk, never a newer one.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

# Hugging Face's own TGI client, for tests/test_http_tgi.py: it pins huggingface_hub<1.0,
# which transformers 5 in .venv cannot take, so it lives in a venv of its own (no torch).
TGI_CLIENT_VERSION := 0.7.0
TGI_CLIENT_VENV := .cache/tgi-client-venv
TGI_CLIENT_STAMP := $(TGI_CLIENT_VENV)/.installed-$(TGI_CLIENT_VERSION)

tgi-client-venv: $(TGI_CLIENT_STAMP)

$(TGI_CLIENT_STAMP):
	$(PYTHON) -m venv $(TGI_CLIENT_VENV)
	$(TGI_CLIENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		text-generation==$(TGI_CLIENT_VERSION)
	touch $(TGI_CLIENT_STAMP)

demo: venv
	$(PY) -m student_trainer.demo

test: venv tgi-client-venv
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check .

# Regenerate teacher_service/proto/ from protos/teacher.proto (tests fail when it is stale).
proto: venv
	$(PY) scripts/gen_proto.py

bench: venv
	$(PY) bench/bench_service.py

# One GKD step: teacher behind the service vs in-process vs TRL (when `pip install trl`).
bench-trainer: venv
	$(PY) bench/bench_trainer.py

# Tokens/s and bytes/token: gRPC vs native HTTP (msgpack, JSON) vs /v1/completions.
bench-http: venv
	$(PY) bench/bench_http.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info
