# cmdgate: `make demo` shows it working, `make test` checks everything. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint typecheck proto proto-check pytest test-systemd bench bench-quick clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "cmdgate needs Python 3.11 or newer as $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The spawn (agent/_spawn.c) is compiled at install: a C compiler and Python's headers.
$(VENV)/.cc: | $(BIN)/python
	@if ! command -v cc >/dev/null || ! $(BIN)/python -c 'import sys, sysconfig, os; \
	  sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing a C compiler and Python's headers (apt-get)"; \
	    apt-get install -y -q gcc libc6-dev python3-dev >/dev/null; \
	  else echo "cmdgate needs a C compiler (cc) and Python.h: e.g. apt-get install gcc python3-dev"; \
	    exit 1; fi; fi
	@command -v cc >/dev/null || { echo "still no C compiler (cc)"; exit 1; }
	touch $@

# Dependencies only when pyproject.toml changes; the package itself on every run,
# so that new modules are linked into the (strict) editable install.
$(VENV)/.deps: pyproject.toml | $(BIN)/python $(VENV)/.cc
	CFLAGS=-Werror $(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=strict \
	  >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	touch $@

# A real OpenID provider (npm oidc-provider) for the interop test, exactly as locked.
OIDC := tests/fixtures/oidc
$(OIDC)/node_modules/.package-lock.json: $(OIDC)/package-lock.json
	cd $(OIDC) && npm ci --no-audit --no-fund --loglevel=error

install: $(VENV)/.deps $(OIDC)/node_modules/.package-lock.json
	@CFLAGS=-Werror $(BIN)/pip install --quiet --no-deps --no-build-isolation -e . \
	  --config-settings editable_mode=strict >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy -p cmdgate -p tests
	MYPYPATH=bench $(BIN)/mypy bench

# Regenerate the committed gRPC code from proto/ with the pinned grpcio-tools.
proto: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=proto --pyi_out=proto --grpc_python_out=proto --mypy_grpc_out=proto \
	  proto/cmdgate/v1/agent.proto

proto-check: install
	$(BIN)/pytest -q tests/test_proto_drift.py

pytest: install
	$(BIN)/pytest -q

test: lint typecheck pytest

# The units and the installer judged by systemd, and a real systemd booted as PID 1 in
# private namespaces (needs root); `make pytest` runs it too, but may skip it.
test-systemd: install
	CMDGATE_REQUIRE_SYSTEMD_TEST=1 $(BIN)/pytest -q tests/test_systemd.py

# Figures side by side with OpenSSH: BENCHMARKS.md and bench/latency.png.
# The ssh columns need: apt-get install -y openssh-server openssh-client
$(VENV)/.bench-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]' --config-settings editable_mode=strict \
	  >$(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }
	touch $@

bench: install $(VENV)/.bench-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-quick: BENCH_ARGS += --quick
bench-quick: bench

demo: install
	@BIN=$(BIN) sh client/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
