# Hypervisor. `make run` starts it; `make test` runs every test. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

AGENTS_STAMP := node_modules/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: install bytecode browser agents run test test-fast bench lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Our modules compiled ahead, as pip compiles every installed package: with
# PYTHONDONTWRITEBYTECODE set, each worker would compile them again as it starts (a
# sixth of its start-up). Only changed files are compiled again; a stale file is
# still read from its source.
bytecode: install
	$(PY) -m compileall -q hypervisor_site workqueue herds pull_api bench

# The browser tests drive Debian's Chromium; never a downloaded browser.
browser:
	@test -x /usr/bin/chromium || { \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The real agent CLIs (versions pinned in package.json and package-lock.json), for the
# tests that run them against local stand-ins of their vendors' APIs. Without npm those
# tests are skipped and say why.
$(AGENTS_STAMP): package.json package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --no-audit --no-fund --loglevel=error && touch $(AGENTS_STAMP); \
	else echo "npm not found: the tests of the real agent CLIs will be skipped"; fi

agents: $(AGENTS_STAMP)

# `make run ADDR=0.0.0.0:9000` serves elsewhere.
run: bytecode
	$(PY) manage.py start $(if $(ADDR),--addr $(ADDR))

# Tests run in TEST_PROCESSES processes, each with its own test database: most tests
# wait on the worker processes, servers and browser they start, and the machine idled
# through a serial run. Those marked `alone` (one restarts the database server) run after.
TEST_PROCESSES ?= 2

test: bytecode browser agents
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist worksteal -m "not alone"
	$(PY) -m pytest -m alone

# The development loop: no browser, no tests that start many processes.
test-fast: bytecode
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist worksteal -m "not slow and not browser"

# The peers the benchmarks compare with (django-tasks, Procrastinate): only `make bench`.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: bytecode $(BENCH_STAMP)
	$(PY) bench/run.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) var node_modules
