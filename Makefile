# wslb: `make run` for a demo, `make test` for everything CI checks.
CARGO ?= cargo
FUZZ_SECONDS ?= 60
FUZZ_CI_SECONDS ?= 20
APT ?= $(shell command -v sudo >/dev/null 2>&1 && [ "$$(id -u)" != 0 ] && echo sudo) apt-get

.PHONY: all build run test test-deps test-unit fmt fmt-check clippy fuzz fuzz-ci bench bench-deps bench-scale bench-smoke soak clean \
	autobahn-deps autobahn-quick conformance ws-witness-deps ws-witness

all: build

build:
	$(CARGO) build --release --bins --examples

run: build
	bash scripts/demo.sh

test: test-deps fmt-check clippy test-unit bench-smoke fuzz-ci autobahn-quick ws-witness

# Real external peers the tests drive: curl, Node (its `http` server), headless Chromium,
# HAProxy (the PROXY protocol sender and receiver, the L4 tier of docs/SCALING.md),
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
	@command -v haproxy >/dev/null || ($(APT) update -qq && $(APT) install -y -qq haproxy)

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

# The comparison (bench/run.sh), then the scale run (bench/scale.sh: cost per held WebSocket).
bench: build
	bash bench/run.sh
	bash bench/scale.sh --no-build

# RSS, KiB per connection, climb rate and echo p99 while 2,500/5,000/9,900 WebSockets are
# held, per proxy; SCALE_ARGS passes options, e.g. SCALE_ARGS='--max 50000' where the
# descriptor limit allows.
SCALE_ARGS ?=
bench-scale: build
	bash bench/scale.sh --no-build $(SCALE_ARGS)

bench-smoke:
	bash bench/smoke.sh

# 10 minutes of churn; RSS and descriptors must stay flat (SOAK_SECS to change the length).
soak: build
	bash bench/soak.sh

# Autobahn|Testsuite (Python 2.7 from pyenv, installed into target/autobahn) and a Node `ws`
# witness (ws@8 into target/node). Both compare wslb with what the endpoints do directly.
autobahn-deps:
	bash scripts/autobahn/install.sh

# Both directions without 9.*, 12.*, 13.* (~1 min): fails if any case differs from direct.
autobahn-quick: autobahn-deps
	$(CARGO) build --bin wslb --example autobahn_client
	python3 scripts/autobahn/conformance.py --quick --out target/autobahn/quick

ws-witness-deps:
	@[ -f target/node/node_modules/ws/package.json ] || \
		(mkdir -p target/node && npm install --silent --no-save --prefix target/node ws@8)

# 20 messages over --max-frame-size from Node's ws client: 1009 every time, and the backend
# gets a close frame every time.
ws-witness: ws-witness-deps
	$(CARGO) build --bin wslb
	node scripts/ws_witness/oversize.cjs target/debug/wslb

# Everything: all 433 Autobahn cases both ways (the client direction against Autobahn's echo
# server and Python websockets), release build; per-case table in target/autobahn/full.
conformance: autobahn-deps ws-witness-deps build
	python3 scripts/autobahn/conformance.py --echo both --out target/autobahn/full \
		--wslb target/release/wslb --client target/release/examples/autobahn_client
	node scripts/ws_witness/oversize.cjs target/release/wslb

clean:
	$(CARGO) clean
