# Two commands for a newcomer: `make run` starts the app, `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run run-offline test lint format browser clean

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

browser:  ## Debian's chromium for the browser tests (installed when root and missing)
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	  else echo "chromium is missing: browser tests will be skipped (apt-get install chromium)"; fi; }

test: $(VENV)/.installed-dev browser  ## unit, API and browser tests on tiny offline models
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.installed-dev  ## ruff (code, README examples) and hadolint (Dockerfile)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
