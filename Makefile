# Every target that runs Python creates the venv first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
MNIST_FILES ?= ../shared/datasets/mnist
MODELS_DIR ?= models
MODEL_NAME ?= mnist
PERCENT ?= 10
PRESET ?= best
# gunicorn's port for `make serve`; HOST_PORT is nginx's published port (make up, swarm-up).
PORT ?= 8000
HOST_PORT ?= 8000
# Extra trainer flags, e.g. make train PRESET=seed EPOCHS=5 TRAIN_ARGS="--lr 1.0"
TRAIN_ARGS ?=
PYTEST_ARGS ?=

# The trainer's flags, for `train` and `train-docker` alike (the container has its own paths).
TRAIN_FLAGS := --preset $(PRESET) \
	$(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
	$(if $(LR),--lr $(LR)) $(if $(SEED),--seed $(SEED)) $(if $(SIZES),--sizes $(SIZES)) \
	$(if $(TRAIN_LIMIT),--train-limit $(TRAIN_LIMIT)) $(TRAIN_ARGS)

.PHONY: help venv data train evaluate export-feedback serve test e2e browser lint format bench \
	bench-train bench-serve bench-front-door bench-grpc bench-feedback proto up rollout swarm-up swarm-down down logs \
	train-docker clean promote canary rollback settings-doc

help: ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements/service.txt requirements/trainer.txt requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt
	$(PY) -m pip install -q -e .
	touch $@

venv: $(VENV)/.installed ## create the virtualenv with every pinned dependency

# From local *-ubyte.gz files when MNIST_FILES exists (checked and unpacked by core.mnist, the
# project's one MNIST reader), else torchvision downloads them. t10k-labels is written last.
$(DATA_DIR)/MNIST/raw/t10k-labels-idx1-ubyte: | $(VENV)/.installed
	@if [ -d "$(MNIST_FILES)" ]; then \
		$(PY) -m core.mnist unpack "$(MNIST_FILES)" "$(DATA_DIR)"; \
	else \
		echo "no $(MNIST_FILES): torchvision downloads MNIST into $(DATA_DIR)"; \
		$(PY) -c "from trainer.data import load_mnist; load_mnist('$(DATA_DIR)', download=True)"; \
	fi

data: $(DATA_DIR)/MNIST/raw/t10k-labels-idx1-ubyte ## MNIST into DATA_DIR/MNIST/raw: unpacked from MNIST_FILES, else downloaded

train: venv ## train and publish a new version (PRESET=best|seed, EPOCHS=, LR=, SEED=, TRAIN_ARGS=, FEEDBACK=dir)
	@if [ -d "$(MNIST_FILES)" ]; then $(MAKE) --no-print-directory data; fi
	$(PY) -m trainer train --data-dir $(DATA_DIR) --models-dir $(MODELS_DIR) $(TRAIN_FLAGS) \
		$(if $(FEEDBACK),--feedback $(FEEDBACK))

evaluate: venv ## re-score a published model on the test set (VERSION=N, default newest; FEEDBACK=dir: its holdout too)
	$(PY) -m trainer evaluate --data-dir $(DATA_DIR) --models-dir $(MODELS_DIR) $(if $(VERSION),--version $(VERSION)) \
		$(if $(FEEDBACK),--feedback $(FEEDBACK))

FEEDBACK_OUT ?= corrections.npz
export-feedback: venv ## write the corrections in FEEDBACK (default ./feedback) to FEEDBACK_OUT (.npz)
	$(PY) -m trainer export-feedback --feedback $(or $(FEEDBACK),feedback) --out $(FEEDBACK_OUT)

# Release labels in MODELS_DIR/MODEL_NAME/labels.json; every worker follows within MODEL_POLL_SECONDS.
RELEASE := MODELS_DIR=$(MODELS_DIR) MODEL_NAME=$(MODEL_NAME) $(PY) -m core.release

promote: venv ## make a version stable for every worker and replica (VERSION=N, MODEL_NAME=)
	$(RELEASE) promote "$(VERSION)"

canary: venv ## send PERCENT (default 10) of unpinned requests to a version (VERSION=N PERCENT=)
	$(RELEASE) canary "$(VERSION)" --percent "$(PERCENT)"

rollback: venv ## make the previous stable version stable again (MODEL_NAME=)
	$(RELEASE) rollback

serve: venv ## run the service locally under gunicorn on PORT
	PORT=$(PORT) MODELS_DIR=$(MODELS_DIR) $(VENV)/bin/gunicorn -c gunicorn.conf.py service.wsgi:app

test: venv data ## unit, integration (real gunicorn) and fuzz tests
	$(PY) -m pytest tests/core tests/trainer tests/service tests/bench tests/deploy $(PYTEST_ARGS)

e2e: venv data ## end-to-end tests against a real Docker engine (docker compose)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

browser: venv ## the draw-a-digit page in headless Chromium
	$(PY) -m pytest tests/browser $(PYTEST_ARGS)

proto: venv ## regenerate the gRPC stubs in service/proto from its .proto (grpcio-tools)
	$(PY) -m service.proto.generate

settings-doc: venv ## rewrite the settings table of docs/settings.md from core/settings.py
	$(PY) -m core.settings --write docs/settings.md

lint: venv ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench-train: venv data ## training speed: this trainer vs the per-example loop vs PyTorch
	$(PY) bench/train_speed.py

bench-serve: venv ## serving throughput: /predict vs /healthz on one gunicorn
	$(PY) bench/serve_load.py

bench-front-door: venv ## PNG /predict through nginx + replicas (docker compose) vs straight to one replica
	$(PY) -m bench.front_door

bench-grpc: venv ## single-image V2 infer: gRPC ModelInfer vs REST on one gunicorn (tritonclient)
	$(PY) -m bench.grpc_vs_rest

bench-feedback: venv ## what one POST /feedback write costs with its fsync, and /predict with feedback on and off
	$(PY) -m bench.feedback_write

bench: bench-train bench-serve bench-front-door bench-grpc bench-feedback ## all benchmarks

# HOST_PORT, like every compose variable, reaches compose from the command line (make up HOST_PORT=9000),
# the shell or .env; the Makefile's default is not passed, so .env keeps its say.
up: ## build and start nginx + the api replicas on HOST_PORT; when running, a rollout (no failed request)
	@if [ -n "$$(docker compose ps -q api 2>/dev/null)" ]; then $(MAKE) --no-print-directory rollout; \
	else docker compose up -d --build --wait; fi

rollout: ## rebuild the api image, then replace the running replicas one at a time
	docker compose build api
	deploy/compose/rollout.sh

# Docker Swarm (deploy/swarm/stack.yml, docs/deploy-swarm.md); needs `docker swarm init` once.
STACK ?= mnist
API_IMAGE ?= mnist-api
# Configs are immutable: a changed nginx.conf gets a new config name, so a redeploy picks it up.
NGINX_CONF_DIGEST = $(shell sha256sum deploy/nginx/nginx.conf | cut -c1-12)
SWARM_ENV = STACK=$(STACK) HOST_PORT=$(HOST_PORT) HOST_MODELS_DIR=$(abspath $(MODELS_DIR)) \
	NGINX_CONF_DIGEST=$(NGINX_CONF_DIGEST)

# The image is deployed under a tag made of its id: a rebuilt image is a changed spec, so the
# redeploy is a rolling update; an unchanged one is no update at all.
swarm-up: ## build the api image, deploy (or update, rolling) the swarm stack STACK on HOST_PORT (API_REPLICAS=)
	docker build -f service/Dockerfile -t $(API_IMAGE):latest .
	tag=$(API_IMAGE):$$(docker image inspect -f '{{.Id}}' $(API_IMAGE):latest | cut -d: -f2 | cut -c1-12) && \
	docker tag $(API_IMAGE):latest $$tag && \
	$(SWARM_ENV) API_IMAGE=$$tag docker stack deploy -c deploy/swarm/stack.yml --resolve-image never \
		--detach=false $(STACK)

swarm-down: ## remove the swarm stack STACK (the swarm itself stays)
	docker stack rm --detach=false $(STACK)

down: ## stop and remove the containers
	docker compose --profile train down -v --remove-orphans

logs: ## follow nginx's and the api replicas' logs
	docker compose logs -f nginx api

train-docker: ## train in the trainer container; the running api serves the new version live (PRESET=, EPOCHS=, ...)
	@if [ -d "$(MNIST_FILES)" ]; then $(MAKE) --no-print-directory data; fi
	mkdir -p $(DATA_DIR)
	HOST_UID=$$(id -u) HOST_GID=$$(id -g) HOST_DATA_DIR=$(abspath $(DATA_DIR)) \
	docker compose --profile train run --rm trainer train $(TRAIN_FLAGS)

clean: ## remove caches (keeps the venv, data and models)
	rm -rf .pytest_cache .ruff_cache .hypothesis artifacts
