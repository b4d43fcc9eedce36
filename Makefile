# EfficientAD: train -> export -> serve -> measure -> deploy.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
EAD := $(VENV)/bin/efficientad
# The CPU build of torch (a file on this machine's disk); on a GPU host set TORCH_SPEC to a CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_RUN ?= runs/demo
DEMO_MODEL ?= models/demo

.PHONY: install test lint format demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# Each stage adds its own targets in mk/<stage>.mk (demo, bench, docker, soak, ...).
-include mk/*.mk
