# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint proto bench bench-trainer clean

venv: $(STAMP)

# torch first and pinned (constraints.txt): the CPU build on local disk, never a newer one.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) -m student_trainer.demo

test: venv
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

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info
