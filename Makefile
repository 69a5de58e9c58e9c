# Everything a developer or CI runs. `make run` and `make test` work on a fresh clone.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := shared api-service processor-service mailer-service
SOURCES := shared/src api-service/src processor-service/src mailer-service/src
PYTEST := $(BIN)/pytest

.PHONY: install run test test-unit test-integration test-e2e lint format bench clean

$(STAMP): $(addsuffix /pyproject.toml,$(PACKAGES)) requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check \
		$(addprefix -e ./,$(PACKAGES)) -r requirements-dev.txt
	@touch $@

install: $(STAMP) ## create .venv and install the four distributions and the dev tools

# `make run` runs the Procfile with honcho's Manager, so it can judge the stop
# by every service's exit code (the honcho command exits 130 after Ctrl-C
# whatever they did). On a terminal it first moves into a process group of its
# own and makes that the terminal's foreground: Ctrl-C then reaches honcho,
# which stops the services with SIGTERM, and not make, which would end with
# "Error 130" or "Interrupt" however cleanly they stopped. It gives the
# terminal back before it exits: 0 if every service exited 0, else 1. The
# services read .env themselves (the environment wins); honcho's own .env
# loading, which would override the environment, is not used.
define RUN_SERVICES
import os
import signal
import sys
from pathlib import Path

from honcho.environ import parse_procfile
from honcho.manager import Manager

manager = Manager()
for name, command in parse_procfile(Path("Procfile").read_text()).processes.items():
    manager.add_process(name, command)
signal.signal(signal.SIGHUP, lambda signum, frame: manager.terminate())

make_group = os.getpgrp()
try:
    on_terminal = os.tcgetpgrp(0) == make_group
except OSError:
    on_terminal = False
if on_terminal:
    os.setpgid(0, 0)
    ignored = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(0, os.getpgrp())
    signal.signal(signal.SIGTTOU, ignored)
    # Ctrl-Z would stop honcho alone, with make waiting for it and the shell
    # unable to take the terminal back: it does nothing instead.
    signal.signal(signal.SIGTSTP, signal.SIG_IGN)
try:
    manager.loop()
finally:
    if on_terminal:
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        os.tcsetpgrp(0, make_group)

# honcho 2.0 keeps each process's exit code here (None: it never stopped).
codes = {name: process.get("returncode") for name, process in manager._processes.items()}
unclean = sorted(name for name, code in codes.items() if code != 0)
if unclean:
    print("make run: not stopped cleanly: " + ", ".join(unclean), file=sys.stderr)
sys.exit(1 if unclean else 0)
endef

run: export RUN_SERVICES_PY = $(value RUN_SERVICES)
run: install ## start the three services with prefixed logs (Ctrl-C stops them)
	@$(BIN)/python scripts/ensure_rabbitmq.py
	@PATH="$(abspath $(BIN)):$$PATH" exec $(BIN)/python -c "$$RUN_SERVICES_PY"

test: lint ## lint, then every test tier
	$(PYTEST)

test-unit: install
	$(PYTEST) -m unit

test-integration: install
	$(PYTEST) -m integration

test-e2e: install
	$(PYTEST) -m e2e

lint: install ## ruff (lint and format check) and mypy --strict
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(SOURCES)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install ## throughput figures, printed (see bench/README.md)
	$(BIN)/python bench/pipeline_throughput.py

clean:
	rm -rf $(VENV) outbox .pytest_cache .mypy_cache .ruff_cache
