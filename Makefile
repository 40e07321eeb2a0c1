# Two commands do everything on a fresh machine:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DATA := data/fashion-mnist
FMNIST_SRC := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup data demo test serve stop clean

help:
	@echo "make demo   - set up, train on Fashion-MNIST, export, archive, serve, classify, load test"
	@echo "make test   - set up and run the test suite (CPU)"
	@echo "make serve  - serve model_store/ with TorchServe in the foreground; make stop ends it"

# Idempotent set-up: the venv is rebuilt only when pyproject.toml changes.
setup: $(VENV)/.installed $(FMNIST_SRC)/train-images-idx3-ubyte.gz

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[serve,dev]'
	@touch $@

$(FMNIST_SRC)/train-images-idx3-ubyte.gz:
	$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist

data: setup
	$(PY) -m training prepare-fashion-mnist --out $(DATA)

demo: setup
	$(PY) -m scripts.demo

test: setup
	$(PY) -m pytest -ra

serve: setup
	$(PY) -m scripts.ts_server serve

stop:
	@$(PY) -m scripts.ts_server stop

clean:
	rm -rf runs/demo exports/demo model_store/*.mar logs .torchserve
