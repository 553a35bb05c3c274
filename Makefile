# wslb: `make run` for a demo, `make test` for everything CI checks.
CARGO ?= cargo
FUZZ_SECONDS ?= 60
FUZZ_CI_SECONDS ?= 20

.PHONY: all build run test test-unit fmt fmt-check clippy fuzz fuzz-ci bench clean

all: build

build:
	$(CARGO) build --release --bins --examples

run: build
	bash scripts/demo.sh

test: fmt-check clippy test-unit fuzz-ci

# Unit tests, integration tests (real sockets on 127.0.0.1), fuzz corpus replay. `cargo test`
# also builds examples/echo_backend, which the integration tests start.
test-unit:
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

clean:
	$(CARGO) clean
