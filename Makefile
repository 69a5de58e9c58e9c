# Everything a developer or CI runs. `make run` and `make test` work on a fresh clone.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := shared api-service processor-service mailer-service
SOURCES := shared/src api-service/src processor-service/src mailer-service/src
# Tests run in two processes side by side (pytest-xdist): each test has its own vhost,
# ports, folders and PostgreSQL database, and an e2e test mostly waits on its services.
# loadgroup keeps a module whose tests share running services (xdist_group) in one
# process. PYTEST_WORKERS=0 runs them in this one.
PYTEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup
ASYNCAPI_TOOLS := tools/asyncapi
ASYNCAPI_STAMP := $(VENV)/asyncapi/node_modules/.package-lock.json

.PHONY: install test-tools run test test-unit test-integration test-e2e lint format bench clean docs screenshots

$(STAMP): $(addsuffix /pyproject.toml,$(PACKAGES)) requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		$(addprefix -e ./,$(PACKAGES)) -r requirements-dev.txt
	@touch $@

install: $(STAMP) ## create .venv and install the four distributions and the dev tools

test-tools: install $(ASYNCAPI_STAMP) $(BIN)/promtool ## and the tools only the tests use (AsyncAPI parser, promtool)

run: install ## start the services (api, status, processor, mailer) with prefixed logs (Ctrl-C stops them)
	@$(BIN)/python scripts/ensure_rabbitmq.py
	@PATH="$(abspath $(BIN)):$$PATH" exec $(BIN)/python scripts/run_services.py

test: lint test-tools ## lint, then every test tier
	$(PYTEST)

test-unit: test-tools
	$(PYTEST) -m unit

test-integration: test-tools
	$(PYTEST) -m integration

test-e2e: test-tools
	$(PYTEST) -m e2e

lint: install ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(SOURCES)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ## the pipeline in several shapes against the broker's ceiling, one table (see bench/README.md; ARGS=--all)
	$(BIN)/python bench/suite.py $(ARGS)

clean:
	rm -rf $(VENV) outbox .pytest_cache .mypy_cache .ruff_cache

# The official AsyncAPI parser, which a unit test runs on docs/asyncapi.yaml. It goes
# into .venv with the other tools, out of the tree and the docker context. Without
# npm the install goes on and that test skips (under CI=true it fails).
$(ASYNCAPI_STAMP): $(ASYNCAPI_TOOLS)/package.json $(ASYNCAPI_TOOLS)/package-lock.json
	@if command -v npm >/dev/null; then \
		mkdir -p $(VENV)/asyncapi && cp $^ $(VENV)/asyncapi/ && \
		npm ci --prefix $(VENV)/asyncapi --ignore-scripts --no-audit --no-fund --silent; \
	else \
		echo "npm not found: the AsyncAPI validation test will skip (and fail under CI=true)"; \
	fi

docs: install ## render docs/asyncapi.yaml and docs/schemas/ from the event models
	$(BIN)/python scripts/render_event_docs.py

# selenium and pillow drive the browser and shrink the PNGs; the project does not
# use them, so they go into .venv here and not into requirements-dev.txt.
screenshots: install ## docs/images/: the management UI with the pipeline at work (needs chromium, chromium-driver)
	$(BIN)/pip install --quiet --disable-pip-version-check selenium pillow
	$(BIN)/python scripts/screenshot_management_ui.py

# promtool, which a unit test runs on observability/prometheus.yml and the dashboard's
# queries: taken from Debian's prometheus package into .venv, nothing else installed.
# Without apt the install goes on and those tests skip (under CI=true they fail).
$(BIN)/promtool: | $(STAMP)
	@if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
		work="$$(mktemp -d)" && \
		(cd "$$work" && apt-get download prometheus >/dev/null 2>&1) && \
		dpkg-deb -x "$$work"/prometheus_*.deb "$$work/root" && \
		cp "$$work/root/usr/bin/promtool" $@; \
		rm -rf "$$work"; \
	fi; \
	test -x $@ || echo "promtool not installed: the Prometheus config tests will skip (and fail under CI=true)"

