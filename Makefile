# wslb: `make run` for a demo, `make test` for everything CI checks.
CARGO ?= cargo
FUZZ_SECONDS ?= 60
FUZZ_CI_SECONDS ?= 20
APT ?= $(shell command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo) apt-get

.PHONY: all build run test test-deps test-unit fmt fmt-check clippy fuzz fuzz-ci bench bench-deps bench-smoke clean

all: build

build:
	$(CARGO) build --release --bins --examples

run: build
	bash scripts/demo.sh

test: test-deps fmt-check clippy test-unit bench-smoke fuzz-ci

# Real external peers the tests drive: curl, Node (its `http` server), headless Chromium,
# and Python packages (websockets, prometheus_client, gunicorn, uvicorn) in the project's
# own virtual environment .venv, never the system Python. Installed only when missing.
VENV ?= .venv
PY_TEST_DEPS = 'websockets>=14' prometheus_client gunicorn uvicorn
test-deps:
	@command -v curl >/dev/null || ($(APT) update -qq && $(APT) install -y -qq curl)
	@command -v node >/dev/null || ($(APT) update -qq && $(APT) install -y -qq nodejs)
	@test -x $(VENV)/bin/python3 || python3 -m venv $(VENV)
	@$(VENV)/bin/python3 -c 'import websockets, prometheus_client, gunicorn, uvicorn' 2>/dev/null || \
		$(VENV)/bin/python3 -m pip install -q $(PY_TEST_DEPS)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		($(APT) update -qq && $(APT) install -y -qq chromium)

# Unit tests, integration tests (real sockets on 127.0.0.1), fuzz corpus replay. Building
# all targets first makes examples/echo_backend, which the integration tests start.
test-unit:
	$(CARGO) build --all-targets
	$(CARGO) test --all-targets
	$(CARGO) test --doc

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

fuzz-ci:
	bash fuzz/run.sh $(FUZZ_CI_SECONDS)

bench-deps:
	@command -v haproxy >/dev/null && command -v nginx >/dev/null && command -v wrk >/dev/null || \
		($(APT) update -qq && $(APT) install -y -qq haproxy nginx-light wrk)

bench: build
	bash bench/run.sh

bench-smoke:
	bash bench/smoke.sh

clean:
	$(CARGO) clean
